-- KEYS: lease, job. ARGV: worker id, ttl ms, attempt.
-- Extends the lease while the worker holds it. A lease that expired while Redis was away (a
-- restart, a partition) is taken back only if the job still runs this very attempt: nobody has
-- started it since, so the run is still the job's one live run.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if holder then return 0 end
local st = redis.call('HMGET', KEYS[2], 'status', 'attempts', 'worker_id')
if st[1] ~= 'running' or st[2] ~= ARGV[3] or st[3] ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
