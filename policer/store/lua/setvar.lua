-- policer: set a dialog variable on a live dialog only (never recreates an ended one).
--
-- KEYS[1] dialog hash   ARGV[1] field ('v:' .. name)   ARGV[2] value
-- Returns 1 when set, 0 when the dialog is not live.

local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'early' and state ~= 'confirmed' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
