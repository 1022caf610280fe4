-- KEYS: job, events, running, expiry, lease.
-- ARGV: status, allowed ',a,b,', now, expire_at, key ttl, idem ttl, event data, maxlen,
--       queue prefix, fence (the attempt that may finish the job; '' = any),
--       <field value pairs from 11>
-- The fence is checked here, in the same step as the change: a worker whose attempt was
-- superseded (its lease lapsed and another worker started the job) can no longer end it.
local st = redis.call('HMGET', KEYS[1], 'status', 'model', 'id', 'idem_key', 'attempts')
if not st[1] then return {'missing', ''} end
if not string.find(ARGV[2], ',' .. st[1] .. ',', 1, true) then return {'conflict', st[1]} end
if ARGV[10] ~= '' and st[5] ~= ARGV[10] then return {'fenced', st[1]} end
finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], st, ARGV[1], ARGV[3], ARGV[4], ARGV[5],
       ARGV[6], ARGV[7], ARGV[8], ARGV[9], 11)
return {'ok', st[1]}
