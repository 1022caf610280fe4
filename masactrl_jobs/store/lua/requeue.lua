-- KEYS: job, events, lease, running, taken, broker list.
-- ARGV: id, since before (ms), queue prefix, maxlen, broker message.
-- Puts a job whose worker is gone back at the head of its queue, in one step: status `queued`
-- again (no stale `running`), first place in the queue index, a `requeued` event, and a fresh
-- broker message, so nothing can be lost between the decision and the message. It was dequeued
-- once already, so it goes ahead of every job waiting now, in both places: its message is
-- RPUSHed (workers BRPOP, so that end is the next one out) and its index score sits below the
-- current head's, so the `queue_position` 1 it reports is the order workers will take.
-- Returns {attempts} when it acted, {} when not (another janitor acted, a worker holds the
-- lease, the job ended or moved on).
local id = ARGV[1]
local st = redis.call('HMGET', KEYS[1], 'status', 'model', 'created_at', 'attempts')
if not st[1] or (st[1] ~= 'running' and st[1] ~= 'queued') then
  redis.call('ZREM', KEYS[4], id)
  redis.call('ZREM', KEYS[5], id)
  return {}
end
if redis.call('EXISTS', KEYS[3]) == 1 then return {} end
local index = KEYS[5]
if st[1] == 'running' then index = KEYS[4] end
local since = redis.call('ZSCORE', index, id)
if not since or tonumber(since) > tonumber(ARGV[2]) then return {} end
redis.call('ZREM', KEYS[4], id)
redis.call('ZREM', KEYS[5], id)
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'worker_id', 'progress')
local queue = ARGV[3] .. st[2]
-- A job taken but never started is still in the index; it must not count as its own head.
redis.call('ZREM', queue, id)
local score = math.floor(tonumber(st[3]) * 1000)
local head = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
if head[2] and tonumber(head[2]) <= score then score = tonumber(head[2]) - 1 end
redis.call('ZADD', queue, score, id)
local attempts = st[4] or '0'
xadd(KEYS[2], ARGV[4], 'requeued', '{"status":"queued","attempt":' .. attempts .. '}')
redis.call('RPUSH', KEYS[6], ARGV[5])
return {attempts}
