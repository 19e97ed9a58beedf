-- settle: resolve a hold once. KEYS[1]: the hold. ARGV: base, hold_id, spent, uncertain
-- A hold never seen gets a tombstone: its reserve may have timed out on the caller's
-- side and still be on its way here; reserve refuses a tombstoned id.
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'state', 'cancelled')
  redis.call('PEXPIRE', KEYS[1], TOMBSTONE_MS)
  return 0
end
return resolve(ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[3]) > 0 and 'settled' or 'released')
