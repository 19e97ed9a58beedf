-- alert_thresholds: mark the budget thresholds a key's and its team's spent money has
-- reached in a day and a month, each once. KEYS[1]: the key record.
-- ARGV: base, key_id, team, day, month, day_mark_s, month_mark_s, thresholds...
-- (ascending percentages). Spent is what was kept (uncertain included), never what is
-- only held: a hold may still be released. A limit absent or 0 has no thresholds.
-- Marks live beside the usage they watch (same hash tag), one hash per scope and
-- period, expiring after the period.
-- Returns {scope, id, name, kind, period, threshold, spent, limit} for each new mark.
local base, key_id, team = ARGV[1], ARGV[2], ARGV[3]
local out = {}

local function check(scope, id, name, record, kind, period, field, mark_s)
  local r = redis.call('HMGET', record, field, 'format')
  local limit = stored_limit(r[1], r[2])
  if not limit or limit <= 0 then return end
  local spent = tonumber(redis.call('HGET', usage_key(base, scope, id, period), 'spent') or '0')
  local marks = base .. 'alerted:' .. scope .. ':' .. id .. ':' .. period
  for i = 8, #ARGV do
    if spent * 100 < limit * tonumber(ARGV[i]) then break end
    if redis.call('HSETNX', marks, ARGV[i], spent) == 1 then
      redis.call('EXPIRE', marks, mark_s)
      out[#out + 1] = { scope, id, name, kind, period, ARGV[i], spent, limit }
    end
  end
end

local name = redis.call('HGET', KEYS[1], 'name')
if not name then return out end
local levels = { { 'key', key_id, name, KEYS[1] } }
if team ~= '' and redis.call('EXISTS', base .. 'team') == 1 then
  levels[2] = { 'team', team, team, base .. 'team' }
end
for _, l in ipairs(levels) do
  check(l[1], l[2], l[3], l[4], 'day', ARGV[4], 'daily', tonumber(ARGV[6]))
  check(l[1], l[2], l[3], l[4], 'month', ARGV[5], 'monthly', tonumber(ARGV[7]))
end
return out
