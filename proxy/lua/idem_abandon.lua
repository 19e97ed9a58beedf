-- idem_abandon: forget an owner's in-flight claim; if it has not arrived yet (it timed
-- out on the way), mark the owner gone so that the claim takes nothing when it lands.
-- KEYS[1]: the record; KEYS[2]: the owner's "gone" mark. ARGV: owner, ttl_ms
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
redis.call('SET', KEYS[2], '1', 'PX', tonumber(ARGV[2]))
return 0
