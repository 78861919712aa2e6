-- policer: functions shared by the scripts. load_lua() puts this file in front of
-- admit.lua, release.lua and renew.lua, so each script stays one EVALSHA.
--
-- P is the namespace prefix 'policer:{ns}:'. Every key a function touches starts with
-- P, so it sits in the same Redis Cluster slot as the script's declared keys.

-- Redis's clock in ms, shifted by a test offset (0 in production).
local function now_ms(offset)
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(offset)
end

-- End one live dialog: leave every profile, its node's set and the state sets, count
-- it, and write its call-end record. Returns the record as a flat list
-- {record id, field, value, ...}, or nil when the dialog was not live.
local function end_dialog(P, did, reason, now, cdr_maxlen)
  local dkey = P .. 'd:' .. did
  local h = redis.call('HMGET', dkey, 'state', 'expires', 'keys', 'nkey')
  if h[1] ~= 'early' and h[1] ~= 'confirmed' then return nil end
  -- the record outlived its end in script time (only when a test moves the clock)
  if tonumber(h[2]) <= now then return nil end
  for zkey in string.gmatch(h[3] or '', '[^\n]+') do
    redis.call('ZREM', zkey, did)
  end
  if h[4] then redis.call('ZREM', h[4], did) end
  redis.call('ZREM', P .. 'early', did)
  redis.call('ZREM', P .. 'confirmed', did)
  redis.call('HSET', dkey, 'state', 'ended', 'end_ms', now, 'end_reason', reason,
             'expires', now + 32000)
  -- kept briefly so that late retransmissions see the dialog as decided, not as new
  redis.call('PEXPIRE', dkey, 32000)
  local stats = P .. 'stats'
  redis.call('HINCRBY', stats, 'ended', 1)
  redis.call('HINCRBY', stats, 'ended:' .. reason, 1)
  if reason == 'failed' or reason == 'cancel' then
    redis.call('HINCRBY', stats, 'failed', 1)
  end
  local all = redis.call('HGETALL', dkey)
  local rec = {'dialog_id', did, 'reason', reason, 'end_ms', now}
  for j = 1, #all, 2 do
    local f = all[j]
    local head = string.sub(f, 1, 2)
    if f == 'init_ms' or f == 'start_ms' or f == 'profiles' or head == 'i:' or head == 'v:' then
      rec[#rec + 1] = f
      rec[#rec + 1] = all[j + 1]
    end
  end
  local id = redis.call('XADD', P .. 'cdr', 'MAXLEN', '~', cdr_maxlen, '*', unpack(rec))
  table.insert(rec, 1, id)
  return rec
end

-- Nodes whose lease lapsed (a proxy killed -9, a host lost): end up to `batch` of
-- their dialogs (reason node_lost). A node leaves the node set once it has none left.
-- Returns how many dialogs were ended.
local function sweep_lost_nodes(P, now, batch, cdr_maxlen)
  local done = 0
  local nodes = P .. 'nodes'
  local lost = redis.call('ZRANGEBYSCORE', nodes, '-inf', now, 'LIMIT', 0, 4)
  for _, node in ipairs(lost) do
    if done >= batch then break end
    local nkey = P .. 'n:' .. node
    local ids = redis.call('ZRANGE', nkey, 0, batch - done - 1)
    for _, did in ipairs(ids) do
      if end_dialog(P, did, 'node_lost', now, cdr_maxlen) then
        done = done + 1
      else
        redis.call('ZREM', nkey, did)  -- ended or expired already
      end
    end
    if redis.call('ZCARD', nkey) == 0 then
      redis.call('ZREM', nodes, node)
      redis.call('HINCRBY', P .. 'stats', 'nodes_lost', 1)
    end
  end
  return done
end

