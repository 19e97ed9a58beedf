-- reserve: check key, budgets (key and team, day and month), concurrency and rpm
-- (GCRA on this server's clock), then take the hold. All or nothing.
-- KEYS[1]: the key record (routes the call; every key touched shares its hash tag)
-- ARGV: base, key_id, hold_id, amount, day, month, ttl_ms (the lease), model, and for a
-- claim to link: claim record, its gone mark, fingerprint, claim ttl_ms, owner,
-- owned ("1": already taken by this request; "0": take it if free), keep_ms
local base, key_id, hold_id = ARGV[1], ARGV[2], ARGV[3]
local amount, day, month = tonumber(ARGV[4]), ARGV[5], ARGV[6]
local ttl = tonumber(ARGV[7])
local now = now_ms()
expire(base, now, 100)
-- Released (tombstoned) before it arrived, or sent twice: never a second hold.
if redis.call('EXISTS', base .. 'hold:' .. hold_id) == 1 then return { 'cancelled' } end

local key = redis.call('HMGET', KEYS[1],
  'id', 'revoked', 'team', 'daily', 'monthly', 'rpm', 'concurrency', 'format')
if not key[1] then return { 'unknown_key' } end
if key[2] == '1' then return { 'revoked' } end
local team = key[3] or ''

local levels = {
  { 'key', key_id, day, stored_limit(key[4], key[8]), 'budget_key_daily' },
  { 'key', key_id, month, stored_limit(key[5], key[8]), 'budget_key_monthly' },
}
if team ~= '' then
  local t = redis.call('HMGET', base .. 'team', 'daily', 'monthly', 'format')
  levels[3] = { 'team', team, day, stored_limit(t[1], t[3]), 'budget_team_daily' }
  levels[4] = { 'team', team, month, stored_limit(t[2], t[3]), 'budget_team_monthly' }
end
-- A limit of 0 refuses any paid call; nil (no limit) is not checked.
for _, l in ipairs(levels) do
  if l[4] then
    local u = redis.call('HMGET', usage_key(base, l[1], l[2], l[3]), 'held', 'spent')
    if (tonumber(u[1]) or 0) + (tonumber(u[2]) or 0) + amount > l[4] then
      return { l[5] }
    end
  end
end

local concurrency = stored_limit(key[7], key[8])
local rpm = stored_limit(key[6], key[8])
-- A concurrency or rpm of 0 allows no call at all, however long one waits.
if concurrency == 0 or rpm == 0 then return { 'zero_limit' } end
local active_key = base .. 'active:' .. key_id
if concurrency and redis.call('ZCARD', active_key) >= concurrency then
  return { 'concurrency', 1000 }
end

local tat_key = base .. 'tat:' .. key_id
local new_tat = nil
if rpm then
  local interval = 60000 / rpm
  local burst = 60000 - interval
  local tat = tonumber(redis.call('GET', tat_key) or '0')
  if tat < now then tat = now end
  local wait = tat - burst - now
  if wait > 0 then return { 'rpm', math.ceil(wait) } end
  new_tat = tat + interval
end

-- Every check passed: take the hold everywhere at once.
if new_tat then redis.call('SET', tat_key, tostring(new_tat), 'PX', 120000) end
local remaining = {}
for _, l in ipairs(levels) do
  local k = usage_key(base, l[1], l[2], l[3])
  redis.call('HINCRBY', k, 'held', amount)
  redis.call('HINCRBY', k, 'requests', 1)
  redis.call('EXPIRE', k, USAGE_TTL)
  if l[1] == 'team' and l[4] then
    local u = redis.call('HMGET', k, 'held', 'spent')
    remaining[#remaining + 1] = l[3]
    remaining[#remaining + 1] = l[4] - tonumber(u[1]) - (tonumber(u[2]) or 0)
  end
end
for _, period in ipairs({ day, month }) do
  local k = usage_key(base, 'model', ARGV[8], period)
  redis.call('HINCRBY', k, 'requests', 1)
  redis.call('EXPIRE', k, USAGE_TTL)
end
local deadline = now + ttl
local hold_key = base .. 'hold:' .. hold_id
redis.call('HSET', hold_key, 'state', 'held', 'key', key_id, 'team', team,
  'amount', amount, 'day', day, 'month', month, 'deadline', deadline, 'model', ARGV[8])
redis.call('PEXPIRE', hold_key, ttl + 86400000)
redis.call('ZADD', base .. 'holds', deadline, hold_id)
redis.call('ZADD', active_key, deadline, hold_id)
redis.call('PEXPIRE', active_key, ttl + 60000)
local claimed = 0
if ARGV[9] then
  if ARGV[14] == '1' then
    claimed = 1
  else
    claimed = claim(ARGV[9], ARGV[10], ARGV[11], tonumber(ARGV[12]), ARGV[13])
  end
  if claimed == 1 then
    -- The claim lives as long as the hold: renewed with it, settled with it if it expires.
    redis.call('HSET', hold_key, 'claim', ARGV[9], 'owner', ARGV[13], 'keep', ARGV[15])
  end
end
return { 'ok', remaining, claimed }
