-- KEYS: job, events. ARGV: preview json, maxlen. Returns {updated, cancel requested}.
-- The job keeps only its latest preview; the stream carries each one as a `preview` event.
local st = redis.call('HMGET', KEYS[1], 'status', 'cancel_requested')
if st[1] ~= 'running' then return {0, st[2] == '1' and 1 or 0} end
redis.call('HSET', KEYS[1], 'preview', ARGV[1])
xadd(KEYS[2], ARGV[2], 'preview', ARGV[1])
return {1, st[2] == '1' and 1 or 0}
