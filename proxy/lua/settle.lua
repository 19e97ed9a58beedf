-- settle: resolve a hold once. KEYS[1]: the hold. ARGV: base, hold_id, spent, uncertain
return resolve(ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[3]) > 0 and 'settled' or 'released')
