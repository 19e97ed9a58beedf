-- history: spend per (name, period) of one scope in one group, for cells with any.
-- KEYS[1]: a key of the group (routes the call). ARGV: base, scope, the periods joined
-- by spaces, then the names. Returns a flat list of (name index, period index, spent,
-- uncertain, requests), 1-based.
local base, scope = ARGV[1], ARGV[2]
local periods = {}
for p in string.gmatch(ARGV[3], '%S+') do periods[#periods + 1] = p end
local out = {}
for i = 4, #ARGV do
  local prefix = base .. 'u:' .. scope .. ':' .. ARGV[i] .. ':'
  for j, period in ipairs(periods) do
    local u = redis.call('HMGET', prefix .. period, 'spent', 'uncertain', 'requests')
    if u[1] or u[3] then
      out[#out + 1] = i - 3
      out[#out + 1] = j
      out[#out + 1] = tonumber(u[1] or '0')
      out[#out + 1] = tonumber(u[2] or '0')
      out[#out + 1] = tonumber(u[3] or '0')
    end
  end
end
return out
