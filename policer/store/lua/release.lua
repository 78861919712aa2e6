-- policer: end a dialog (BYE, CANCEL, failure, proxy timeout, operator). Idempotent.
--
-- KEYS[1] dialog hash   KEYS[2] stats hash   KEYS[3] early zset   KEYS[4] confirmed zset
-- KEYS[5] call-record stream
-- ARGV[1] dialog id  ARGV[2] reason  ARGV[3] clock offset ms  ARGV[4] stream MAXLEN (~)
-- Returns {} when the dialog was not live, else the call-end record as a flat list
-- {record id, field, value, ...}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3])
local dkey = KEYS[1]
local did = ARGV[1]
local reason = ARGV[2]
local h = redis.call('HMGET', dkey, 'state', 'expires')
local state = h[1]
if state ~= 'early' and state ~= 'confirmed' then return {} end
-- the record outlived its end in script time (only when a test moves the clock)
if h[2] and tonumber(h[2]) <= now then return {} end

local keys = redis.call('HGET', dkey, 'keys') or ''
for zkey in string.gmatch(keys, '[^\n]+') do
  redis.call('ZREM', zkey, did)
end
redis.call('ZREM', KEYS[3], did)
redis.call('ZREM', KEYS[4], did)
redis.call('HSET', dkey, 'state', 'ended', 'end_ms', now, 'end_reason', reason,
           'expires', now + 32000)
-- kept briefly so that late retransmissions see the dialog as decided, not as new
redis.call('PEXPIRE', dkey, 32000)
redis.call('HINCRBY', KEYS[2], 'ended', 1)
redis.call('HINCRBY', KEYS[2], 'ended:' .. reason, 1)
if reason == 'failed' or reason == 'cancel' then
  redis.call('HINCRBY', KEYS[2], 'failed', 1)
end

local h = redis.call('HGETALL', dkey)
local rec = {'dialog_id', did, 'reason', reason, 'end_ms', now}
for j = 1, #h, 2 do
  local f = h[j]
  if f == 'init_ms' or f == 'start_ms' or f == 'profiles' or string.sub(f, 1, 2) == 'i:'
     or string.sub(f, 1, 2) == 'v:' then
    rec[#rec + 1] = f
    rec[#rec + 1] = h[j + 1]
  end
end
local id = redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[4], '*', unpack(rec))
table.insert(rec, 1, id)
return rec
