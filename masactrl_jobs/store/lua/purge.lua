-- KEYS: expiry, running. ARGV: prefix, then job ids. Removes every trace of each job in Redis.
local prefix = ARGV[1]
local n = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local job = prefix .. ':job:' .. id
  local st = redis.call('HMGET', job, 'tenant', 'model', 'idem_key')
  if st[1] then redis.call('ZREM', prefix .. ':tenant:' .. st[1] .. ':jobs', id) end
  if st[2] then
    local q = prefix .. ':queue:' .. st[2]
    redis.call('ZREM', q, id)
    redis.call('ZREM', q .. ':deadlines', id)
    if st[1] then
      local tq = q .. ':tenant:' .. st[1]
      if redis.call('ZREM', tq, id) == 1 and redis.call('EXISTS', tq) == 0 then
        redis.call('ZREM', q .. ':active', st[1])
      end
    end
  end
  if st[3] and st[3] ~= '' then redis.call('DEL', st[3]) end
  redis.call('DEL', job, job .. ':events', job .. ':lease')
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  n = n + 1
end
return n
