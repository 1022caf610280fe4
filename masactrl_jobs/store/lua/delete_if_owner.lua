-- KEYS: a lease or lock. ARGV: owner token. Deletes it only while the token holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
