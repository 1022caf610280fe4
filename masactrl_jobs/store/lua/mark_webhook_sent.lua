-- KEYS: webhook sent set. ARGV: message id, ttl seconds.
redis.call('SADD', KEYS[1], ARGV[1])
return redis.call('EXPIRE', KEYS[1], ARGV[2])
