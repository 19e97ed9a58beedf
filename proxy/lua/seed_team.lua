-- seed_team: create a team from the config file only if the store has none of that
-- name, so that a team changed through the admin API is never overwritten.
-- KEYS[1]: the team record. ARGV: field, value pairs (the format mark among them)
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
