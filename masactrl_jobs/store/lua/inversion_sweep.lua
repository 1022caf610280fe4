-- KEYS: inversion-cache index. ARGV: last used before, limit, max entries.
-- Returns the entries to delete: unused since the cutoff, then the least recently used beyond
-- the entry limit. Read in one step so the count and the ranges agree.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local excess = redis.call('ZCARD', KEYS[1]) - #expired - tonumber(ARGV[3])
if excess > 0 then
  local oldest = redis.call('ZRANGE', KEYS[1], #expired, #expired + excess - 1)
  for _, key in ipairs(oldest) do table.insert(expired, key) end
end
return expired
