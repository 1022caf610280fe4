-- KEYS: running, lease. ARGV: id, started before (ms), now ms. One janitor wins the claim.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
