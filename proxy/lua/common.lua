-- Shared by every script (prepended when the scripts are loaded).
-- All keys of one group share the hash tag in `base` ("apiyi:{t:team}:"), so a
-- script touches one cluster slot only.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function usage_key(base, scope, name, period)
  return base .. 'u:' .. scope .. ':' .. name .. ':' .. period
end

-- A stored limit: nil for no limit. A record with the format mark ('2') leaves a
-- limit out for none and 0 allows nothing; one written before it stored 0 for none.
local function stored_limit(value, format)
  if not value or value == '' then return nil end
  local limit = tonumber(value)
  if limit == 0 and format ~= '2' then return nil end
  return limit
end

local USAGE_TTL = 400 * 86400
local TOMBSTONE_MS = 2 * 86400000

-- Move a hold's money from held to spent (uncertain marks the part that may or may
-- not have been billed); the rest is refunded. Acts once per hold.
local function resolve(base, hold_id, spent, uncertain, state)
  local hold_key = base .. 'hold:' .. hold_id
  local h = redis.call('HMGET', hold_key, 'state', 'key', 'team', 'amount', 'day', 'month')
  if h[1] ~= 'held' then
    return 0
  end
  local amount = tonumber(h[4])
  if spent > amount then spent = amount end
  if spent < 0 then spent = 0 end
  if uncertain > spent then uncertain = spent end
  if uncertain < 0 then uncertain = 0 end
  local scopes = { { 'key', h[2] } }
  if h[3] and h[3] ~= '' then
    scopes[2] = { 'team', h[3] }
  end
  for _, s in ipairs(scopes) do
    for _, period in ipairs({ h[5], h[6] }) do
      local k = usage_key(base, s[1], s[2], period)
      redis.call('HINCRBY', k, 'held', -amount)
      if spent > 0 then redis.call('HINCRBY', k, 'spent', spent) end
      if uncertain > 0 then redis.call('HINCRBY', k, 'uncertain', uncertain) end
    end
  end
  redis.call('HSET', hold_key, 'state', state, 'spent', spent, 'uncertain', uncertain)
  redis.call('ZREM', base .. 'holds', hold_id)
  redis.call('ZREM', base .. 'active:' .. h[2], hold_id)
  return 1
end

-- Holds past their deadline (their replica died) become uncertain spend.
local function expire(base, now, limit)
  local ids = redis.call('ZRANGEBYSCORE', base .. 'holds', '-inf', now, 'LIMIT', 0, limit)
  local n = 0
  for _, id in ipairs(ids) do
    local amount = tonumber(redis.call('HGET', base .. 'hold:' .. id, 'amount') or '0')
    n = n + resolve(base, id, amount, amount, 'expired')
    redis.call('ZREM', base .. 'holds', id)
  end
  return n
end

-- Take a free idempotency scope for its owner, unless the owner's abandon came first
-- (its "gone" mark). Returns 1 if claimed.
local function claim(record, gone, fingerprint, ttl_ms, owner)
  if redis.call('EXISTS', record) == 1 then return 0 end
  if redis.call('DEL', gone) == 1 then return 0 end
  redis.call('HSET', record, 'fingerprint', fingerprint, 'state', 'in_flight', 'owner', owner)
  redis.call('PEXPIRE', record, ttl_ms)
  return 1
end
