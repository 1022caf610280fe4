-- KEYS: as _FINISH. ARGV: now, expire_at, key ttl, idem ttl, event data, maxlen, queue prefix.
local st = redis.call('HMGET', KEYS[1], 'status', 'model', 'id', 'idem_key', 'cancel_requested')
if not st[1] then return {'missing', ''} end
if st[1] == 'running' then
  if st[5] ~= '1' then
    redis.call('HSET', KEYS[1], 'cancel_requested', '1')
    xadd(KEYS[2], ARGV[6], 'status', '{"status":"running","cancel_requested":true}')
  end
  return {'flagged', st[1]}
end
if st[1] ~= 'queued' then return {'conflict', st[1]} end
finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], st, 'canceled', ARGV[1], ARGV[2], ARGV[3],
       ARGV[4], ARGV[5], ARGV[6], ARGV[7], nil)
return {'canceled', st[1]}
