-- KEYS: a lease or lock. ARGV: owner token, ttl ms. Extends it only while the token holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
