-- KEYS: webhook schedule. ARGV: now, limit, claimed until.
-- Due retries are not removed here but pushed to `claimed until`: the caller removes each once
-- the broker has it. A scheduler that dies in between leaves them to come due again, so a crash
-- can repeat a retry (receivers drop duplicates by webhook-id) but never lose one. Atomic, so
-- each due retry goes to one scheduler.
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, item in ipairs(items) do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], item) end
return items
