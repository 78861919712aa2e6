-- policer: live members of one or more profile zsets (deadline after now), read-only.
--
-- KEYS: profile zsets   ARGV[1] clock offset ms
-- Returns the counts in KEYS order, then now (ms).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf')
end
out[#KEYS + 1] = now
return out
