-- KEYS: bucket. ARGV: rate per second, burst, cost.
local allowed, retry, tokens = take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]),
                                          tonumber(ARGV[3]))
return {allowed, tostring(retry), tostring(tokens)}
