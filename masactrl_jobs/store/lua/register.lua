-- KEYS: workers zset, worker-models set, the model's shape key.
-- ARGV: worker id, deadline, model, shape JSON ('' when not reported), shape TTL in ms.
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
end
return 1
