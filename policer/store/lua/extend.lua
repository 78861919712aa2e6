-- policer: confirm (answered) or refresh a live dialog: push its deadline on.
--
-- KEYS[1] dialog hash   KEYS[2] early zset   KEYS[3] confirmed zset
-- ARGV[1] dialog id  ARGV[2] 'confirm' | 'refresh'  ARGV[3] timeout ms
-- ARGV[4] clock offset ms
-- Returns 1 when the dialog is live, 0 when it is unknown, ended, rejected or past its
-- deadline.

local now = now_ms(ARGV[4])
local dkey = KEYS[1]
local h = redis.call('HMGET', dkey, 'state', 'deadline')
local state = h[1]
if state ~= 'early' and state ~= 'confirmed' then return 0 end
-- past its deadline the dialog stopped counting and its slot may be taken: never revive it
if tonumber(h[2] or 0) <= now then return 0 end

local timeout = tonumber(ARGV[3])
local deadline = now + timeout
local more = redis.call('HMGET', dkey, 'keys', 'nkey')
local zkeys = more[1] or ''
if more[2] then zkeys = zkeys .. '\n' .. more[2] end  -- the node's set of its dialogs
for zkey in string.gmatch(zkeys, '[^\n]+') do
  redis.call('ZADD', zkey, deadline, ARGV[1])
  if redis.call('PTTL', zkey) < timeout + 60000 then
    redis.call('PEXPIRE', zkey, timeout + 60000)
  end
end
if ARGV[2] == 'confirm' and state == 'early' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HSET', dkey, 'state', 'confirmed', 'start_ms', now, 'deadline', deadline)
  redis.call('ZADD', KEYS[3], deadline, ARGV[1])
else
  redis.call('HSET', dkey, 'deadline', deadline)
  if state == 'early' then
    redis.call('ZADD', KEYS[2], deadline, ARGV[1])
  else
    redis.call('ZADD', KEYS[3], deadline, ARGV[1])
  end
end
redis.call('HSET', dkey, 'expires', deadline + 60000)
redis.call('PEXPIRE', dkey, timeout + 60000)
return 1
