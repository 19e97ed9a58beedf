-- results_reserve: reserve room for one replay body before any of it is written.
-- The replay space is capped at `total` bytes, so it never crowds out a ledger in the
-- same Redis: expired bodies are reclaimed first, then the oldest are dropped until
-- the new one fits (the newest are the likeliest to be retried).
-- KEYS[1]: the sizes hash. ARGV: base, id, size, ttl_ms, total. Returns 1 if reserved.
local base, id = ARGV[1], ARGV[2]
local size, ttl, total = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if size > total then return 0 end
local now = now_ms()
for _, old in ipairs(redis.call('ZRANGEBYSCORE', base .. 'expiry', '-inf', now, 'LIMIT', 0, 100)) do
  drop_result(base, old)
end
local used = tonumber(redis.call('GET', base .. 'used') or '0')
while used + size > total do
  local oldest = redis.call('ZRANGE', base .. 'order', 0, 0)[1]
  if not oldest then
    used = 0  -- nothing left to drop: the count had drifted (a flush, an eviction)
    redis.call('SET', base .. 'used', 0)
    break
  end
  drop_result(base, oldest)
  used = tonumber(redis.call('GET', base .. 'used') or '0')
end
redis.call('HSET', KEYS[1], id, size)
redis.call('ZADD', base .. 'expiry', now + ttl, id)
redis.call('ZADD', base .. 'order', now, id)
redis.call('INCRBY', base .. 'used', size)
return 1
