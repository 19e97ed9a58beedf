-- key_write: write a key record and announce the change to every replica's cache, in
-- one step: a writer that dies in between cannot leave the caches unaware of it.
-- KEYS[1]: the key record. ARGV: the changes channel, the key's hash, the number n of
-- fields to set, n field/value pairs, then the fields to drop (limits with none)
local n = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 4, 3 + 2 * n))
if #ARGV > 3 + 2 * n then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 4 + 2 * n))
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
