-- KEYS: workers zset, worker-models set. ARGV: worker id, deadline, model.
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
