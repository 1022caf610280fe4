-- KEYS: running, taken. ARGV: since before (ms), limit, job prefix.
-- Jobs started, or taken from the broker, before the cutoff whose lease is gone: their worker
-- died (or stalled past its lease). requeue.lua re-checks each one before acting.
local out = {}
for _, index in ipairs(KEYS) do
  local ids = redis.call('ZRANGEBYSCORE', index, '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
  for _, id in ipairs(ids) do
    if redis.call('EXISTS', ARGV[3] .. id .. ':lease') == 0 then table.insert(out, id) end
  end
end
return out
