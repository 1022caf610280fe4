-- KEYS: running, taken, expiry.
-- ARGV: 1 message's job id, 2 model, 3 worker id, 4 lease ms, 5 now, 6 now ms, 7 maxlen,
--       8 job prefix, 9 queue prefix, 10 queue policy, 11 expire_at, 12 key ttl, 13 idem ttl.
-- One decision: which job a worker that received a run_job message for `model` starts now.
-- The job is started here (status, attempt, lease) in the same step, so no two messages start
-- one job and no job is chosen without being started.
-- FIFO: the message's own job, as Celery delivered it. Fair: every message is one start for the
-- model, and the job is the head of the queue policy: the active tenant with the lowest pass,
-- its highest priority, its oldest. Jobs past their deadline end `expired` on the way (never
-- started), as does the message's job when it was cancelled while its worker was gone.
-- Returns {outcome, job id, attempts, {ids of jobs ended here}}: started | none | leased (the job
-- to start holds another worker's lease: a worker of the protocol before this one is starting
-- it; nothing is started).
local jp, model, qp, now = ARGV[8], ARGV[2], ARGV[9], tonumber(ARGV[5])
local mine = ARGV[1]
-- The message is consumed by this decision, whatever it decides (see WorkerOperations.take).
redis.call('ZREM', KEYS[2], mine)
local ended = {}
local function end_job(id, status)
  local job = jp .. id
  local st = redis.call('HMGET', job, 'status', 'model', 'id', 'idem_key')
  finish(job, job .. ':events', KEYS[1], KEYS[3], job .. ':lease', st, status, ARGV[5], ARGV[11],
         ARGV[12], ARGV[13], '{"status":"' .. status .. '"}', ARGV[7], qp, nil)
  table.insert(ended, id)
end
local function start(id)
  local job = jp .. id
  if redis.call('EXISTS', job .. ':lease') == 1 then return {'leased', id, 0, ended} end
  local st = redis.call('HMGET', job, 'started_at', 'tenant')
  local attempts = redis.call('HINCRBY', job, 'attempts', 1)
  redis.call('HSET', job, 'status', 'running', 'worker_id', ARGV[3])
  if not st[1] or st[1] == '' then redis.call('HSET', job, 'started_at', ARGV[5]) end
  dequeue(qp, model, st[2], id)
  redis.call('ZADD', KEYS[1], ARGV[6], id)
  redis.call('SET', job .. ':lease', ARGV[3], 'PX', ARGV[4])
  xadd(job .. ':events', ARGV[7], 'status', '{"status":"running","attempt":' .. attempts .. '}')
  return {'started', id, attempts, ended}
end
local deadlines = qp .. model .. ':deadlines'
for _, id in ipairs(redis.call('ZRANGEBYSCORE', deadlines, '-inf', now, 'LIMIT', 0, 100)) do
  if redis.call('HGET', jp .. id, 'status') == 'queued' then
    end_job(id, 'expired')
  else
    redis.call('ZREM', deadlines, id)
  end
end
-- The message's own job, running with no lease: its worker is gone and this message is its
-- redelivery. It runs again here (the next attempt), or ends if it was cancelled meanwhile.
local x = redis.call('HMGET', jp .. mine, 'status', 'model', 'cancel_requested')
if x[1] == 'running' and x[2] == model and redis.call('EXISTS', jp .. mine .. ':lease') == 0 then
  if x[3] ~= '1' then return start(mine) end
  end_job(mine, 'canceled')
  if ARGV[10] == 'fifo' then return {'none', '', 0, ended} end
end
if ARGV[10] == 'fifo' then
  if x[1] == 'queued' and x[2] == model then return start(mine) end
  return {'none', '', 0, ended}
end
local active = qp .. model .. ':active'
local fair = qp .. model .. ':fair'
-- Bounded: each turn starts a job or drops a stale entry.
for _ = 1, 1000 do
  local head = redis.call('ZRANGE', active, 0, 0, 'WITHSCORES')
  if #head == 0 then break end
  local tenant, pass = head[1], tonumber(head[2])
  local id = redis.call('ZRANGE', tenant_queue(qp, model, tenant), 0, 0)[1]
  if not id then
    redis.call('ZREM', active, tenant)
  elseif redis.call('HGET', jp .. id, 'status') ~= 'queued' then
    dequeue(qp, model, tenant, id)
  else
    local stride = tonumber(redis.call('HGET', fair, 's:' .. tenant)) or STRIDE_UNIT
    redis.call('HSET', fair, 'vtime', pass, 'p:' .. tenant, pass + stride)
    redis.call('ZADD', active, 'XX', pass + stride, tenant)
    return start(id)
  end
end
return {'none', '', 0, ended}
