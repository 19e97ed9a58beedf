-- results_write: append one chunk of a reserved body; the last one makes it readable.
-- Nothing is written once the reservation is gone (expired, or dropped to make room),
-- so the bytes in the replay space never exceed what was reserved.
-- KEYS[1]: the body being written. ARGV: base, id, chunk, last ("1"/"0").
-- Returns 1 while the reservation holds.
local base, id = ARGV[1], ARGV[2]
local expiry = redis.call('ZSCORE', base .. 'expiry', id)
if not expiry then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('RPUSH', KEYS[1], ARGV[3])
redis.call('PEXPIREAT', KEYS[1], expiry)
if ARGV[4] == '1' then
  redis.call('RENAME', KEYS[1], base .. 'body:' .. id)
end
return 1
