local function xadd(stream, maxlen, event, data)
  return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'event', event, 'data', data)
end
-- The queue policy's state for one model (keys.py, "the queue policy"), under qp .. model:
--   ''                queued ids by enqueue time (depth; the FIFO order)
--   ':tenant:' .. t   tenant t's queued ids by priority, then submission order
--   ':active'         tenants with queued jobs, by their pass (the lowest starts next)
--   ':fair'           hash: 'p:' .. t = t's pass, 's:' .. t = t's stride, 'vtime' = the pass
--                     of the latest start (a tenant that becomes active starts there),
--                     'expired' = jobs expired so far (a metric)
--   ':deadlines'      queued ids with a deadline, by deadline (Unix seconds)
-- Weighted fair share is stride scheduling: each start adds the tenant's stride (STRIDE_UNIT /
-- weight) to its pass, so starts follow the weights; ties go to the lower tenant name.
local STRIDE_UNIT = 1000000
local function tenant_queue(qp, model, tenant) return qp .. model .. ':tenant:' .. tenant end
local function enqueue(qp, model, tenant, id, score)
  redis.call('ZADD', tenant_queue(qp, model, tenant), score, id)
  local active = qp .. model .. ':active'
  if not redis.call('ZSCORE', active, tenant) then
    local fair = qp .. model .. ':fair'
    local v = redis.call('HMGET', fair, 'p:' .. tenant, 'vtime')
    -- No credit for time spent idle: a returning tenant starts at the latest start's pass.
    local pass = math.max(tonumber(v[1]) or 0, tonumber(v[2]) or 0)
    redis.call('HSET', fair, 'p:' .. tenant, pass)
    redis.call('ZADD', active, pass, tenant)
  end
end
local function dequeue(qp, model, tenant, id)
  redis.call('ZREM', qp .. model, id)
  redis.call('ZREM', qp .. model .. ':deadlines', id)
  if not tenant then return end
  local tq = tenant_queue(qp, model, tenant)
  if redis.call('ZREM', tq, id) == 1 and redis.call('EXISTS', tq) == 0 then
    redis.call('ZREM', qp .. model .. ':active', tenant)
  end
end
-- How many queued jobs start before this one (0 = next), or nil when it is not queued. FIFO:
-- its rank by enqueue time. Fair: its rank in its tenant's queue, plus, for every other active
-- tenant, the starts whose pass comes first (the pick order of claim.lua, done in closed form).
local function position(qp, model, tenant, id, policy)
  if policy == 'fifo' then return redis.call('ZRANK', qp .. model, id) end
  local rank = redis.call('ZRANK', tenant_queue(qp, model, tenant), id)
  if not rank then return nil end
  local fair = qp .. model .. ':fair'
  local active = redis.call('ZRANGE', qp .. model .. ':active', 0, -1, 'WITHSCORES')
  local strides = {}
  local passes = {}
  for i = 1, #active, 2 do
    local t = active[i]
    passes[t] = tonumber(active[i + 1])
    strides[t] = tonumber(redis.call('HGET', fair, 's:' .. t)) or STRIDE_UNIT
  end
  if not passes[tenant] then return rank end
  local turn = passes[tenant] + rank * strides[tenant]
  local ahead = rank
  for t, pass in pairs(passes) do
    if t ~= tenant then
      local x = (turn - pass) / strides[t]
      local k
      if t < tenant then k = math.floor(x) + 1 else k = math.ceil(x) end
      local n = redis.call('ZCARD', tenant_queue(qp, model, t))
      ahead = ahead + math.max(0, math.min(k, n))
    end
  end
  return ahead
end
-- Move a job to a terminal status and schedule its removal. st = {status, model, id, idem_key}.
local function finish(job, events, running, expiry, lease, st, status, now, expire_at, key_ttl,
                      idem_ttl, data, maxlen, queue_prefix, first_field)
  redis.call('HSET', job, 'status', status, 'completed_at', now)
  if first_field and #ARGV >= first_field then
    redis.call('HSET', job, unpack(ARGV, first_field))
  end
  dequeue(queue_prefix, st[2], redis.call('HGET', job, 'tenant'), st[3])
  if status == 'expired' then redis.call('HINCRBY', queue_prefix .. st[2] .. ':fair', 'expired', 1) end
  redis.call('ZREM', running, st[3])
  redis.call('ZADD', expiry, expire_at, st[3])
  redis.call('DEL', lease)
  if st[4] and st[4] ~= '' then redis.call('EXPIRE', st[4], idem_ttl) end
  local id = xadd(events, maxlen, status, data)
  redis.call('EXPIRE', job, key_ttl)
  redis.call('EXPIRE', events, key_ttl)
  return id
end
-- Token bucket on Redis' clock (gateways need not agree on time). Returns allowed (0/1), the
-- seconds until `cost` tokens are available, and the tokens left.
local function take_token(bucket, rate, burst, cost)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local b = redis.call('HMGET', bucket, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  local allowed = 0
  local retry = 0
  if tokens >= cost then
    tokens = tokens - cost
    allowed = 1
  else
    retry = (cost - tokens) / rate
  end
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('EXPIRE', bucket, math.ceil(burst / rate) + 1)
  return allowed, retry, tokens
end
