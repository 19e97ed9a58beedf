-- forget_key: remove a key that cost nothing (a passthrough key the upstream refused)
-- with what it made in its group, all or nothing, and announce the change to every
-- replica's cache. Returns its key hash if removed, for the caller to drop the indexes
-- outside the group's slot; else 0.
-- KEYS[1]: the key record. ARGV: base, key_id, day, month, the changes channel, then its
-- resolved hold ids
local base, key_id = ARGV[1], ARGV[2]
local key = redis.call('HMGET', KEYS[1], 'id', 'revoked', 'team', 'key_hash')
-- A revocation must outlive the key; a team's tallies count its keys' requests.
if not key[1] or key[2] == '1' or (key[3] and key[3] ~= '') then return 0 end
local active = base .. 'active:' .. key_id
if redis.call('ZCARD', active) > 0 then return 0 end
local doomed = { KEYS[1], active, base .. 'tat:' .. key_id }
for i = 3, 4 do
  local k = usage_key(base, 'key', key_id, ARGV[i])
  local u = redis.call('HMGET', k, 'held', 'spent')
  if (tonumber(u[1]) or 0) ~= 0 or (tonumber(u[2]) or 0) ~= 0 then return 0 end
  doomed[#doomed + 1] = k
end
-- The key has a group of its own (no team): its models' counters there are its alone.
local models = {}
for i = 6, #ARGV do
  local hold = base .. 'hold:' .. ARGV[i]
  local h = redis.call('HMGET', hold, 'state', 'key', 'model')
  if h[1] == 'held' then return 0 end
  if h[2] == key_id then
    doomed[#doomed + 1] = hold
    if h[3] and h[3] ~= '' and not models[h[3]] then
      models[h[3]] = true
      doomed[#doomed + 1] = usage_key(base, 'model', h[3], ARGV[3])
      doomed[#doomed + 1] = usage_key(base, 'model', h[3], ARGV[4])
    end
  end
end
redis.call('DEL', unpack(doomed))
redis.call('PUBLISH', ARGV[5], key[4])
return key[4]
