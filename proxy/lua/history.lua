-- history: spend per (name, period) of one scope in one group, for cells with any.
-- KEYS[1]: a key of the group (routes the call). ARGV: base, scope, n, n names, periods.
-- Returns a flat list of (name index, period index, spent, uncertain, requests), 1-based.
local base, scope, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 1, n do
  local prefix = base .. 'u:' .. scope .. ':' .. ARGV[3 + i] .. ':'
  for j = 4 + n, #ARGV do
    local u = redis.call('HMGET', prefix .. ARGV[j], 'spent', 'uncertain', 'requests')
    if u[1] or u[3] then
      out[#out + 1] = i
      out[#out + 1] = j - 3 - n
      out[#out + 1] = tonumber(u[1] or '0')
      out[#out + 1] = tonumber(u[2] or '0')
      out[#out + 1] = tonumber(u[3] or '0')
    end
  end
end
return out
