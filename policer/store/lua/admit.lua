-- policer: admit one dialog into every profile it belongs to, or into none.
--
-- KEYS[1] dialog hash   KEYS[2] stats hash   KEYS[3] early zset   KEYS[4] confirmed zset
-- KEYS[5] decisions hash
-- KEYS[4+2i] profile zset of member i   KEYS[5+2i] live-limit hash of member i's profile
-- ARGV[1] dialog id  ARGV[2] early timeout ms
-- ARGV[3] 0 ordinary call, 1 emergency call (may use the reserve), 2 emergency with bypass,
--         3 record a call the fallback admitted while Redis was down (no limit checked)
-- ARGV[4] n members  ARGV[5] clock offset ms (tests; 0 in production)
-- ARGV[6] sweep budget: expired entries removed per call (bounds the script's run time)
-- ARGV[7] P (namespace prefix)  ARGV[8] node (encoded; '' = none)
-- ARGV[9] lease ms to renew the node's lease by (0 = the node holds no lease)
-- ARGV[10] end dialogs of lost nodes first (1|0)  ARGV[11] call-record MAXLEN
-- then per member i (6 values): profile, label, live-limit field ('' = none),
--   max (-1 = none), reserve for emergency, shadow (0|1)
-- then info pairs (field, value) recorded with the dialog.
--
-- Returns {admitted, tripped, count, max, bypass, duplicate, shadow}; indexes are 1-based
-- (0 = none).

local now = now_ms(ARGV[5])
local did = ARGV[1]
local dkey = KEYS[1]

-- The same dialog again (retransmission, INVITE re-sent with credentials): same answer.
-- 'expires' is when the record ends in script time (the key's TTL in real time): they
-- differ only when a test moves the clock with ARGV[5].
local prev = redis.call('HMGET', dkey, 'decision', 'expires')
if prev[1] then
  if tonumber(prev[2]) > now then
    local r = {}
    for v in string.gmatch(prev[1], '[^,]+') do r[#r + 1] = tonumber(v) end
    r[6] = 1
    return r
  end
  redis.call('DEL', dkey)
end

local batch = tonumber(ARGV[6])
local n = tonumber(ARGV[4])
local early_ms = tonumber(ARGV[2])
local emergency = ARGV[3] ~= '0'
local bypass_allowed = ARGV[3] == '2'
local record = ARGV[3] == '3'
local P = ARGV[7]
local node = ARGV[8]
if node ~= '' and ARGV[9] ~= '0' then
  redis.call('ZADD', P .. 'nodes', now + tonumber(ARGV[9]), node)
end
-- dialogs of proxies that stopped renewing their lease stop counting: a few per call
-- here, the bulk in the nodes' tick() (renew.lua)
if ARGV[10] == '1' then sweep_lost_nodes(P, now, 10, ARGV[11]) end

-- Bounded clean-up of dialogs whose deadline passed: at most `batch` per set and call.
local function sweep_dialogs(zkey)
  local gone = redis.call('ZRANGEBYSCORE', zkey, '-inf', now, 'LIMIT', 0, batch)
  if #gone > 0 then
    redis.call('ZREM', zkey, unpack(gone))
    redis.call('HINCRBY', KEYS[2], 'expired', #gone)
    redis.call('HINCRBY', KEYS[2], 'ended:expired', #gone)
  end
end
sweep_dialogs(KEYS[3])
sweep_dialogs(KEYS[4])

local tripped, tcount, tmax, bypass, shadow = 0, 0, -1, 0, 0
local budget = batch  -- expired members removed by this call, over all its keys
local base = 11
for i = 1, n do
  local a = base + (i - 1) * 6
  local zkey = KEYS[4 + 2 * i]
  -- expired members never count (ZCOUNT from now on, O(log n)); remove some of them
  local expired = redis.call('ZCOUNT', zkey, '-inf', now)
  if expired > 0 then
    local take = math.min(expired, budget)
    if take > 0 then
      redis.call('ZREMRANGEBYRANK', zkey, 0, take - 1)
      budget = budget - take
    end
  end
  local max = tonumber(ARGV[a + 4])
  local field = ARGV[a + 3]
  if field ~= '' then
    local live = redis.call('HGET', KEYS[5 + 2 * i], field)
    if live then max = tonumber(live) end
  end
  if max >= 0 and not record then
    local count = redis.call('ZCOUNT', zkey, '(' .. now, '+inf')
    local effective = max
    if not emergency then effective = max - tonumber(ARGV[a + 5]) end
    if count >= effective then
      if ARGV[a + 6] == '1' then
        if shadow == 0 then shadow = i; if tripped == 0 then tcount, tmax = count, effective end end
      elseif bypass_allowed then
        if tripped == 0 then tripped, tcount, tmax = i, count, max end
        bypass = 1
      else
        tripped, tcount, tmax = i, count, effective
        break
      end
    end
  end
end

local admitted = 1
if tripped > 0 and bypass == 0 then admitted = 0 end
local decision = table.concat({admitted, tripped, tcount, tmax, bypass, 0, shadow}, ',')
local info_at = base + n * 6 + 1

if admitted == 0 then
  -- remember the rejection for the life of an INVITE transaction (64*T1)
  redis.call('HSET', dkey, 'decision', decision, 'state', 'rejected', 'init_ms', now,
             'expires', now + 32000)
  redis.call('PEXPIRE', dkey, 32000)
  redis.call('HINCRBY', KEYS[2], 'rejected', 1)
  redis.call('HINCRBY', KEYS[5], 'rejected|' .. ARGV[base + (tripped - 1) * 6 + 1], 1)
  return {0, tripped, tcount, tmax, 0, 0, shadow}
end

local deadline = now + early_ms
local keys, labels = {}, {}
for i = 1, n do
  local zkey = KEYS[4 + 2 * i]
  redis.call('ZADD', zkey, deadline, did)
  if redis.call('PTTL', zkey) < early_ms + 60000 then
    redis.call('PEXPIRE', zkey, early_ms + 60000)
  end
  keys[i] = zkey
  labels[i] = ARGV[base + (i - 1) * 6 + 2]
  local result = 'admitted'
  if record then
    result = 'store_error'
  elseif i == tripped then
    result = 'bypassed'
  elseif i == shadow then
    result = 'shadow_rejected'
  end
  redis.call('HINCRBY', KEYS[5], result .. '|' .. ARGV[base + (i - 1) * 6 + 1], 1)
end
redis.call('ZADD', KEYS[3], deadline, did)
local nkey = false
if node ~= '' then
  nkey = P .. 'n:' .. node
  redis.call('ZADD', nkey, deadline, did)
  if redis.call('PTTL', nkey) < early_ms + 60000 then
    redis.call('PEXPIRE', nkey, early_ms + 60000)
  end
end

local fields = {'decision', decision, 'state', 'early', 'init_ms', now, 'deadline', deadline,
                'expires', deadline + 60000,
                'keys', table.concat(keys, '\n'), 'profiles', table.concat(labels, '\n')}
for j = info_at, #ARGV, 2 do
  fields[#fields + 1] = 'i:' .. ARGV[j]
  fields[#fields + 1] = ARGV[j + 1]
end
if nkey then
  fields[#fields + 1] = 'nkey'
  fields[#fields + 1] = nkey
end
redis.call('HSET', dkey, unpack(fields))
redis.call('PEXPIRE', dkey, early_ms + 60000)
redis.call('HINCRBY', KEYS[2], 'processed', 1)
if record then redis.call('HINCRBY', KEYS[2], 'recorded', 1) end
if bypass == 1 then redis.call('HINCRBY', KEYS[2], 'bypassed', 1) end
if shadow > 0 then redis.call('HINCRBY', KEYS[2], 'shadow_rejected', 1) end
return {1, tripped, tcount, tmax, bypass, 0, shadow}
