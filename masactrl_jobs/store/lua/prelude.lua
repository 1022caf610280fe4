local function xadd(stream, maxlen, event, data)
  return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'event', event, 'data', data)
end
-- Move a job to a terminal status and schedule its removal. st = {status, model, id, idem_key}.
local function finish(job, events, running, expiry, lease, st, status, now, expire_at, key_ttl,
                      idem_ttl, data, maxlen, queue_prefix, first_field)
  redis.call('HSET', job, 'status', status, 'completed_at', now)
  if first_field and #ARGV >= first_field then
    redis.call('HSET', job, unpack(ARGV, first_field))
  end
  redis.call('ZREM', queue_prefix .. st[2], st[3])
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
