-- settle: resolve a hold once. KEYS[1]: the hold.
-- ARGV: base, hold_id, spent, uncertain, and (to book a hold the store never saw) key,
-- team, day, month, amount, model.
-- A hold never seen gets a tombstone: its reserve may have timed out on the caller's
-- side and still be on its way here; reserve refuses a tombstoned id. If it was never
-- seen because the store lost its data, what the upstream billed is booked anyway.
-- Returns 1 settled, 2 booked without a hold, 0 nothing changed.
local spent, uncertain = tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[1]) == 0 then
  local booked = 0
  if spent > 0 and ARGV[5] then
    spent, uncertain = clamp(spent, uncertain, tonumber(ARGV[9]))
    book(ARGV[1], ARGV[5], ARGV[6], ARGV[7], ARGV[8], 0, spent, uncertain, 1, ARGV[10])
    booked = 2
  end
  redis.call('HSET', KEYS[1], 'state', booked == 2 and 'booked' or 'cancelled')
  redis.call('PEXPIRE', KEYS[1], TOMBSTONE_MS)
  return booked
end
return resolve(ARGV[1], ARGV[2], spent, uncertain, spent > 0 and 'settled' or 'released')
