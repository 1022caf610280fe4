-- KEYS: job, events, lease, running, taken, broker list.
-- ARGV: id, since before (ms), queue prefix, maxlen, broker message, queue policy.
-- Puts a job whose worker is gone back at the head of its queue, in one step: status `queued`
-- again (no stale `running`), first place in the queue index, a `requeued` event, and a fresh
-- broker message, so nothing can be lost between the decision and the message. It was dequeued
-- once already, so it goes ahead of every job waiting now, in both places: its message is
-- RPUSHed (workers BRPOP, so that end is the next one out) and its index score sits below the
-- current head's (under the fair policy: the head of its tenant's queue), so the position it
-- reports is the order workers will take.
-- Under the fair policy a message is a start for its model, not for the job it names (see
-- claim.lua): a message whose worker died before deciding (a stale `taken` note) is replaced
-- even when the job it names has ended or started elsewhere, because it may have been another
-- queued job's start.
-- Returns {attempts} when it requeued the job, {} when not (another janitor acted, a worker
-- holds the lease, the job ended or moved on).
local id = ARGV[1]
local fair = ARGV[6] == 'fair'
local st = redis.call('HMGET', KEYS[1], 'status', 'model', 'created_at', 'attempts', 'tenant',
                      'priority')
local noted = redis.call('ZSCORE', KEYS[5], id)
local lost_message = noted and tonumber(noted) <= tonumber(ARGV[2])
if not st[1] or (st[1] ~= 'running' and st[1] ~= 'queued') then
  redis.call('ZREM', KEYS[4], id)
  redis.call('ZREM', KEYS[5], id)
  if fair and lost_message and st[1] then redis.call('RPUSH', KEYS[6], ARGV[5]) end
  return {}
end
if redis.call('EXISTS', KEYS[3]) == 1 then return {} end
local index = KEYS[5]
if st[1] == 'running' then index = KEYS[4] end
local since = redis.call('ZSCORE', index, id)
if not since or tonumber(since) > tonumber(ARGV[2]) then return {} end
redis.call('ZREM', KEYS[4], id)
redis.call('ZREM', KEYS[5], id)
local queue = ARGV[3] .. st[2]
if fair and st[1] == 'queued' then
  -- Never dequeued: it keeps its place; only the lost message is replaced.
  redis.call('RPUSH', KEYS[6], ARGV[5])
  return {st[4] or '0'}
end
if fair and lost_message then
  -- Running, and a message taken by a worker that died was noted on it too: replace that one.
  redis.call('RPUSH', KEYS[6], ARGV[5])
end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'worker_id', 'progress')
-- A job taken but never started is still in the index; it must not count as its own head.
redis.call('ZREM', queue, id)
local score = math.floor(tonumber(st[3]) * 1000)
local head = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
if head[2] and tonumber(head[2]) <= score then score = tonumber(head[2]) - 1 end
redis.call('ZADD', queue, score, id)
if st[5] then
  local tq = tenant_queue(ARGV[3], st[2], st[5])
  redis.call('ZREM', tq, id)
  local own = -(tonumber(st[6]) or 0) * 1e13 + math.floor(tonumber(st[3]) * 1000)
  local thead = redis.call('ZRANGE', tq, 0, 0, 'WITHSCORES')
  if thead[2] and tonumber(thead[2]) <= own then own = tonumber(thead[2]) - 1 end
  enqueue(ARGV[3], st[2], st[5], id, own)
end
local attempts = st[4] or '0'
xadd(KEYS[2], ARGV[4], 'requeued', '{"status":"queued","attempt":' .. attempts .. '}')
redis.call('RPUSH', KEYS[6], ARGV[5])
return {attempts}
