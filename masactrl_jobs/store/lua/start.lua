-- KEYS: job, events, running, taken. ARGV: now, now ms, worker id, maxlen, queue prefix.
local st = redis.call('HMGET', KEYS[1], 'status', 'model', 'id', 'cancel_requested', 'started_at',
                      'tenant')
if not st[1] then return {'missing', ''} end
if st[1] ~= 'queued' and st[1] ~= 'running' then return {'terminal', st[1]} end
if st[4] == '1' then return {'cancel_requested', st[1]} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker_id', ARGV[3])
if not st[5] or st[5] == '' then redis.call('HSET', KEYS[1], 'started_at', ARGV[1]) end
dequeue(ARGV[5], st[2], st[6], st[3])
redis.call('ZREM', KEYS[4], st[3])
redis.call('ZADD', KEYS[3], ARGV[2], st[3])
xadd(KEYS[2], ARGV[4], 'status',
     '{"status":"running","attempt":' .. attempts .. '}')
return {'started', tostring(attempts)}
