-- KEYS: job, events, tenant index, queue, expiry, inputs, idempotency, broker list, token bucket,
--       retried job ('' job key when none)
-- ARGV: 1 id, 2 queue score, 3 max depth, 4 use idem, 5 body hash, 6 idem ttl, 7 expire_at,
--       8 event data, 9 maxlen, 10 broker message ('' = none), 11 rate ('' = no limit), 12 burst,
--       13 inputs expire_at, 14 input keys (JSON list), 15 record fields (JSON object of strings),
--       16 tenant, 17 tenant queue score (priority, then submission order), 18 tenant stride,
--       19 deadline ('' = none), 20 retried job id ('' = none), 21 queue prefix, 22 model,
--       23 queue policy
-- Few, large arguments: packing each argument costs the caller more than cjson costs Redis.
-- The checks run cheapest-first and before any write: a replay or a refusal changes nothing.
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[7])
  if existing then return {'duplicate', existing} end
end
if ARGV[20] ~= '' then
  -- A retry: only of an ended job that failed, was canceled or expired, and only once.
  local old = redis.call('HMGET', KEYS[10], 'status', 'retried_by', 'tenant')
  if not old[1] or old[3] ~= ARGV[16] then return {'missing', ''} end
  if old[1] ~= 'failed' and old[1] ~= 'canceled' and old[1] ~= 'expired' then
    return {'not_retryable', old[1]}
  end
  if old[2] then return {'retried', old[2]} end
end
local max_depth = tonumber(ARGV[3])
if max_depth > 0 and redis.call('ZCARD', KEYS[4]) >= max_depth then return {'full', ''} end
if ARGV[11] ~= '' then
  local allowed, retry = take_token(KEYS[9], tonumber(ARGV[11]), tonumber(ARGV[12]), 1)
  if allowed == 0 then return {'rate_limited', tostring(retry)} end
end
local flat = {}
for name, value in pairs(cjson.decode(ARGV[15])) do
  flat[#flat + 1] = name
  flat[#flat + 1] = value
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
local qp, model, tenant = ARGV[21], ARGV[22], ARGV[16]
-- The tenant's weight as its key says now: the latest submission's stride counts.
redis.call('HSET', qp .. model .. ':fair', 's:' .. tenant, ARGV[18])
enqueue(qp, model, tenant, ARGV[1], ARGV[17])
if ARGV[19] ~= '' then redis.call('ZADD', qp .. model .. ':deadlines', ARGV[19], ARGV[1]) end
if ARGV[20] ~= '' then redis.call('HSET', KEYS[10], 'retried_by', ARGV[1]) end
redis.call('ZADD', KEYS[5], ARGV[7], ARGV[1])
for _, key in ipairs(cjson.decode(ARGV[14])) do redis.call('ZADD', KEYS[6], 'GT', ARGV[13], key) end
if ARGV[4] == '1' then redis.call('SET', KEYS[7], ARGV[5] .. ' ' .. ARGV[1], 'EX', ARGV[6]) end
xadd(KEYS[2], ARGV[9], 'status', ARGV[8])
if ARGV[10] ~= '' then redis.call('LPUSH', KEYS[8], ARGV[10]) end
return {'created', tostring(position(qp, model, tenant, ARGV[1], ARGV[23]))}
