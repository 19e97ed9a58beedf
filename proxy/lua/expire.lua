-- expire: turn a group's holds past their deadline into uncertain spend.
-- KEYS[1]: the group's holds index. ARGV: base, limit
return expire(ARGV[1], now_ms(), tonumber(ARGV[2]))
