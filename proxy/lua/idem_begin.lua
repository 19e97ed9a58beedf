-- idem_begin: claim an idempotency scope or report who holds it.
-- KEYS[1]: the record; KEYS[2]: the owner's "gone" mark (its abandon came first).
-- ARGV: fingerprint, ttl_ms, join_only ("1"/"0"), owner
local r = redis.call('HMGET', KEYS[1], 'fingerprint', 'state', 'status', 'result', 'headers')
if not r[1] then
  if ARGV[3] ~= '1' then
    claim(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), ARGV[4])
  end
  return { 'new' }
end
if r[1] ~= ARGV[1] then return { 'mismatch' } end
return { r[2], r[3] or '0', r[4] or '', r[5] or '' }
