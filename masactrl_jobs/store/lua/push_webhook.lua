-- KEYS: webhook outbox. ARGV: message (JSON), ttl seconds.
-- The outbox expires with its job's last event: deliveries past that are over anyway.
redis.call('RPUSH', KEYS[1], ARGV[1])
return redis.call('EXPIRE', KEYS[1], ARGV[2])
