-- KEYS: job. ARGV: delivery json line. Deliveries are JSON lines so appending never re-encodes.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local d = redis.call('HGET', KEYS[1], 'deliveries') or ''
redis.call('HSET', KEYS[1], 'deliveries', d .. ARGV[1] .. '\n')
return 1
