-- renew: move the deadlines of a group's open holds to a lease from now, with their
-- concurrency slots and linked idempotency claims. KEYS[1]: the group's holds index.
-- ARGV: base, lease_ms, hold ids... Returns how many were still open.
local base, lease = ARGV[1], tonumber(ARGV[2])
-- A claim outlives its hold's deadline (CLAIM_LEASES in store/base.py) until a sweep
-- settles both.
local claim_lease = lease * 4
local deadline = now_ms() + lease
local n = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local hold_key = base .. 'hold:' .. id
  local h = redis.call('HMGET', hold_key, 'state', 'key', 'claim', 'owner')
  if h[1] == 'held' then
    n = n + 1
    redis.call('HSET', hold_key, 'deadline', deadline)
    redis.call('PEXPIRE', hold_key, lease + 86400000)
    redis.call('ZADD', base .. 'holds', 'XX', deadline, id)
    redis.call('ZADD', base .. 'active:' .. h[2], 'XX', deadline, id)
    redis.call('PEXPIRE', base .. 'active:' .. h[2], lease + 60000)
    if h[3] and h[3] ~= '' then
      local c = redis.call('HMGET', h[3], 'owner', 'state')
      if c[1] == h[4] and c[2] == 'in_flight' and redis.call('PTTL', h[3]) < claim_lease then
        redis.call('PEXPIRE', h[3], claim_lease)
      end
    end
  end
end
return n
