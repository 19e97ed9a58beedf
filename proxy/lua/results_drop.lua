-- results_drop: give back a reservation whose body could not be written in full.
-- KEYS[1]: the sizes hash. ARGV: base, id
drop_result(ARGV[1], ARGV[2])
return 1
