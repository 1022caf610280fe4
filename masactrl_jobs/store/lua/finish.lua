-- KEYS: job, events, running, expiry, lease.
-- ARGV: status, allowed ',a,b,', now, expire_at, key ttl, idem ttl, event data, maxlen,
--       queue prefix, <field value pairs from 10>
local st = redis.call('HMGET', KEYS[1], 'status', 'model', 'id', 'idem_key')
if not st[1] then return {'missing', ''} end
if not string.find(ARGV[2], ',' .. st[1] .. ',', 1, true) then return {'conflict', st[1]} end
finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], st, ARGV[1], ARGV[3], ARGV[4], ARGV[5],
       ARGV[6], ARGV[7], ARGV[8], ARGV[9], 10)
return {'ok', st[1]}
