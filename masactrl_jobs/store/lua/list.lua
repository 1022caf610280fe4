-- KEYS: tenant index. ARGV: cursor ('' = newest), limit, status ('' = any), max scanned, job
-- prefix, queue prefix, queue policy. Returns {next cursor or '', {hash, rank}...}; ids of
-- records that expired are dropped from the index on the way.
local limit = tonumber(ARGV[2])
local max_scan = tonumber(ARGV[4])
local upper = '+'
if ARGV[1] ~= '' then upper = '(' .. ARGV[1] end
local out = {}
local scanned = 0
local last = nil
local exhausted = false
while #out < limit and scanned < max_scan do
  local ids = redis.call('ZRANGE', KEYS[1], upper, '-', 'BYLEX', 'REV', 'LIMIT', 0, 100)
  if #ids == 0 then exhausted = true break end
  for _, id in ipairs(ids) do
    scanned = scanned + 1
    last = id
    local key = ARGV[5] .. id
    local st = redis.call('HMGET', key, 'status', 'model', 'tenant')
    if not st[1] then
      redis.call('ZREM', KEYS[1], id)
    elseif ARGV[3] == '' or ARGV[3] == st[1] then
      local rank = -1
      if st[1] == 'queued' then
        local r = position(ARGV[6], st[2], st[3], id, ARGV[7])
        if r then rank = r end
      end
      table.insert(out, {redis.call('HGETALL', key), rank})
    end
    if #out >= limit or scanned >= max_scan then break end
  end
  upper = '(' .. last
end
local cursor = ''
if not exhausted and last then cursor = last end
local result = {cursor}
for _, item in ipairs(out) do table.insert(result, item) end
return result
