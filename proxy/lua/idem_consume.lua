-- idem_consume: forget a finished record once its answer was delivered by a replay,
-- so that it is never joined again. KEYS[1]: the record. ARGV: result id
local r = redis.call('HMGET', KEYS[1], 'state', 'result')
if r[1] == 'done' and r[2] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
