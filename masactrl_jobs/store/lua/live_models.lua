-- KEYS: worker-models. ARGV: workers key prefix, now.
local out = {}
for _, model in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. model
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[2])
  if redis.call('ZCARD', key) > 0 then table.insert(out, model) end
end
return out
