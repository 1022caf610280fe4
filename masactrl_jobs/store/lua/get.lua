-- KEYS: job. ARGV: queue prefix, queue policy. Returns {} or {flat hash, queue rank or -1}.
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return {} end
local st = redis.call('HMGET', KEYS[1], 'status', 'model', 'id', 'tenant')
local rank = -1
if st[1] == 'queued' then
  local r = position(ARGV[1], st[2], st[4], st[3], ARGV[2])
  if r then rank = r end
end
return {h, rank}
