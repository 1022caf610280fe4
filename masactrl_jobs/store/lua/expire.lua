-- KEYS: running, expiry. ARGV: now, limit, job prefix, queue prefix, expire_at, key ttl, idem ttl,
-- maxlen, then models. Ends every queued job of those models past its deadline as `expired`
-- (claim.lua does the same for its own model before it picks). Returns the ids it ended.
local out = {}
for i = 9, #ARGV do
  local deadlines = ARGV[4] .. ARGV[i] .. ':deadlines'
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', deadlines, '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])) do
    local job = ARGV[3] .. id
    local st = redis.call('HMGET', job, 'status', 'model', 'id', 'idem_key')
    if st[1] == 'queued' then
      finish(job, job .. ':events', KEYS[1], KEYS[2], job .. ':lease', st, 'expired', ARGV[1],
             ARGV[5], ARGV[6], ARGV[7], '{"status":"expired"}', ARGV[8], ARGV[4], nil)
      table.insert(out, id)
    else
      redis.call('ZREM', deadlines, id)
    end
  end
end
return out
