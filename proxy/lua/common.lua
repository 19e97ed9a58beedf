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

-- Book money in a key's (and its team's) day and month: `held` leaves the hold
-- column, `spent` (of it `uncertain`) is kept, `requests` counted. The model's spend is
-- kept too, in the group (a model's history sums it over every group).
local function book(base, key_id, team, day, month, held, spent, uncertain, requests, model)
  local scopes = { { 'key', key_id } }
  if team and team ~= '' then
    scopes[#scopes + 1] = { 'team', team }
  end
  if model and model ~= '' then
    scopes[#scopes + 1] = { 'model', model }
  end
  for _, s in ipairs(scopes) do
    for _, period in ipairs({ day, month }) do
      local k = usage_key(base, s[1], s[2], period)
      if held ~= 0 and s[1] ~= 'model' then redis.call('HINCRBY', k, 'held', -held) end
      if spent > 0 then redis.call('HINCRBY', k, 'spent', spent) end
      if uncertain > 0 then redis.call('HINCRBY', k, 'uncertain', uncertain) end
      if requests > 0 then
        redis.call('HINCRBY', k, 'requests', requests)
        redis.call('EXPIRE', k, USAGE_TTL)
      end
    end
  end
end

-- What a settle keeps of `amount`: spent in 0..amount, uncertain in 0..spent.
local function clamp(spent, uncertain, amount)
  spent = math.max(0, math.min(spent, amount))
  return spent, math.max(0, math.min(uncertain, spent))
end

-- Move a hold's money from held to spent (uncertain marks the part that may or may
-- not have been billed); the rest is refunded. Acts once per hold.
local function resolve(base, hold_id, spent, uncertain, state)
  local hold_key = base .. 'hold:' .. hold_id
  local h = redis.call('HMGET', hold_key, 'state', 'key', 'team', 'amount', 'day', 'month',
    'model')
  if h[1] ~= 'held' then
    return 0
  end
  local amount = tonumber(h[4])
  spent, uncertain = clamp(spent, uncertain, amount)
  book(base, h[2], h[3], h[5], h[6], amount, spent, uncertain, 0, h[7])
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
    local h = redis.call('HMGET', base .. 'hold:' .. id, 'amount', 'claim', 'owner', 'keep')
    local amount = tonumber(h[1] or '0')
    n = n + resolve(base, id, amount, amount, 'expired')
    redis.call('ZREM', base .. 'holds', id)
    -- Its call may have been billed: a duplicate gets 409, never a second paid call.
    if h[2] and h[2] ~= '' then
      local c = redis.call('HMGET', h[2], 'owner', 'state')
      if c[1] == h[3] and c[2] == 'in_flight' then
        redis.call('HSET', h[2], 'state', 'done', 'status', '504', 'result', '', 'headers', '[]')
        redis.call('PEXPIRE', h[2], tonumber(h[4]))
      end
    end
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

-- Replay bodies (results_*.lua): all under one hash tag, `base` = "apiyi:{res}:".
-- Forget one body and give its reserved bytes back.
local function drop_result(base, id)
  local size = tonumber(redis.call('HGET', base .. 'sizes', id) or '0')
  redis.call('HDEL', base .. 'sizes', id)
  redis.call('ZREM', base .. 'expiry', id)
  redis.call('ZREM', base .. 'order', id)
  redis.call('DEL', base .. 'part:' .. id, base .. 'body:' .. id)
  if size > 0 then redis.call('DECRBY', base .. 'used', size) end
end
