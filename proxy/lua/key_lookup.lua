-- key_lookup: the key record for a presented key's HMAC, in one round trip.
-- KEYS[1]: <prefix>:keyhash:<hmac>. ARGV: prefix
-- (Single-node stores only: the record lives under its group's hash tag.)
local ref = redis.call('GET', KEYS[1])
if not ref then return {} end
local sep = string.find(ref, '|', 1, true)
local group, id = string.sub(ref, 1, sep - 1), string.sub(ref, sep + 1)
return redis.call('HGETALL', ARGV[1] .. ':{' .. group .. '}:key:' .. id)
