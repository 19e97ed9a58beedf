-- idem_begin: claim an idempotency scope or report who holds it.
-- KEYS[1]: the record; KEYS[2]: the owner's "gone" mark (its abandon came first).
-- ARGV: fingerprint, ttl_ms, join_only ("1"/"0"), owner
local r = redis.call('HMGET', KEYS[1], 'fingerprint', 'state', 'status', 'result', 'headers')
if not r[1] then
  if ARGV[3] ~= '1' and redis.call('DEL', KEYS[2]) == 0 then
    redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'state', 'in_flight', 'owner', ARGV[4])
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  end
  return { 'new' }
end
if r[1] ~= ARGV[1] then return { 'mismatch' } end
return { r[2], r[3] or '0', r[4] or '', r[5] or '' }
