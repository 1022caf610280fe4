-- ARGV: queue prefix, priority scale, then models. For the metrics: queued jobs by model, tenant
-- and priority, and jobs expired per model. Returns {{model, tenant, priority, count}...},
-- {{model, expired}...}.
local qp, scale = ARGV[1], tonumber(ARGV[2])
local counts = {}
local expired = {}
for i = 3, #ARGV do
  local model = ARGV[i]
  for _, tenant in ipairs(redis.call('ZRANGE', qp .. model .. ':active', 0, -1)) do
    local by_priority = {}
    local scores = redis.call('ZRANGE', qp .. model .. ':tenant:' .. tenant, 0, -1, 'WITHSCORES')
    for j = 2, #scores, 2 do
      -- score = -priority * scale + enqueue ms (a requeued job sits a little below its head)
      local priority = -math.floor(tonumber(scores[j]) / scale + 0.5 / scale)
      by_priority[priority] = (by_priority[priority] or 0) + 1
    end
    for priority, n in pairs(by_priority) do
      table.insert(counts, {model, tenant, tostring(priority), n})
    end
  end
  table.insert(expired, {model, tonumber(redis.call('HGET', qp .. model .. ':fair', 'expired')) or 0})
end
return {counts, expired}
