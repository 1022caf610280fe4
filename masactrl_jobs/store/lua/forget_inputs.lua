-- KEYS: inputs. ARGV: now, keys... Removes and returns those still expired (a new job may have
-- renewed one since it was listed).
local out = {}
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    table.insert(out, ARGV[i])
  end
end
return out
