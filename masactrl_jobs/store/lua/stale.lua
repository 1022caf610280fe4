-- KEYS: running. ARGV: started before (ms), limit, job prefix.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, id in ipairs(ids) do
  if redis.call('EXISTS', ARGV[3] .. id .. ':lease') == 0 then table.insert(out, id) end
end
return out
