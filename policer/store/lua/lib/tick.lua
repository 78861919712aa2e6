-- ------------------------------------------------------------------ the tick
-- A node's periodic duties (never per INVITE): its lease, the dialogs of lost nodes and
-- those past their deadline (each a bounded batch), stale rate and window state, the
-- state epoch.

local function sweep_lost_nodes(now, batch)
  local done = 0
  local lost = redis.call('ZRANGEBYSCORE', NODES, '-inf', now, 'LIMIT', 0, 4)
  for _, node in ipairs(lost) do
    if done >= batch then break end
    local nkey = P_NODE .. node
    local ids = redis.call('ZRANGE', nkey, 0, batch - done - 1)
    for _, did in ipairs(ids) do
      if end_dialog(did, 'node_lost', now) then
        done = done + 1
      else
        redis.call('ZREM', nkey, did)  -- ended or expired already
      end
    end
    if redis.call('ZCARD', nkey) == 0 then
      redis.call('ZREM', NODES, node)
      redis.call('SREM', NIDX, node)
      redis.call('HINCRBY', STATS, 'nodes_lost', 1)
    end
  end
  return done
end

-- Dialogs whose deadline passed (nobody ended them): end up to `batch` (reason expired,
-- or duration_cap: an answered call that reached its max duration). Until then such a
-- dialog still counts: at most a tick's period (a second) after its deadline.
local function sweep_expired(now, batch)
  local done = 0
  for _, node in ipairs(redis.call('SMEMBERS', NIDX)) do
    if done >= batch then break end
    local nkey = P_NODE .. node
    local ids = redis.call('ZRANGEBYSCORE', nkey, '-inf', now, 'LIMIT', 0, batch - done)
    for _, did in ipairs(ids) do
      local rec = get_record(did, now)
      -- (a dialog id admitted again since, by another node, is that node's now)
      local live = rec ~= nil and is_live(rec) and rec.node == node
      if live and tonumber(rec.deadline) > now then
        redis.call('ZADD', nkey, rec.deadline, did)  -- answered or refreshed since
      else
        local reason = 'expired'
        if live and rec.cap ~= '0' and rec.cap == rec.deadline then reason = 'duration_cap' end
        if live and end_dialog(did, reason, now) then done = done + 1 end
        redis.call('ZREM', nkey, did)
      end
    end
    if redis.call('EXISTS', nkey) == 0 and not redis.call('ZSCORE', NODES, node) then
      redis.call('SREM', NIDX, node)
    end
  end
  return done
end

-- Rate and window state of values that went quiet: a rate whose owed time has passed
-- and windows that have ended say nothing a missing field would not. Walks the T|
-- fields of P c, `batch` fields per tick, resuming where the last tick stopped (P sweep:
-- the HSCAN cursor). Live limits stay.
local function sweep_state(now, batch)
  local skey = NS_PREFIX .. 'sweep'
  local res = redis.call('HSCAN', COUNTS, redis.call('GET', skey) or '0', 'MATCH', 'T|*',
                         'COUNT', batch)
  local fields = res[2]
  local del = {}
  local now_us = now * 1000
  for j = 1, #fields, 2 do
    local v = fields[j + 1]
    local stale = (tonumber(string.match(v, '^%d+')) or 0) <= now_us
    if stale then
      for per, id in string.gmatch(v, '|(%w+)=(%d+):') do
        if window_at(per, now)[1] == id then stale = false; break end
      end
    end
    if stale then del[#del + 1] = fields[j] end
  end
  if #del > 0 then redis.call('HDEL', COUNTS, unpack(del)) end
  redis.call('SET', skey, res[1])
  return #del
end

-- This library's mark in this server's Lua engine: set by the first call after the
-- library was loaded into this server (FUNCTION LOAD, a restart from RDB or AOF, a
-- replica promoted), never replicated. A server that answers with another mark than
-- the epoch's was confirmed with may have lost the last writes (no INFO needed: an ACL
-- without @dangerous commands suffices).
local VM_MARK = nil

local function vm_mark()
  if VM_MARK == nil then
    local t = redis.call('TIME')
    VM_MARK = t[1] .. '.' .. t[2]
  end
  return VM_MARK
end

-- The namespace's state epoch (P epoch: id, and the VM_MARK it was last confirmed
-- with). op 'init': create one when there is none (a fresh namespace: a node's start,
-- policer load into a Redis without the library); one there is (another caller's load
-- made it meanwhile) follows the new mark. op 'reload:<mark>:<run>': the library was
-- just loaded again; the caller read the server's <mark> and the epoch's <run> before:
-- the epoch follows the new mark if it was confirmed with <mark>, or if another load
-- confirmed it since (its run is no longer <run>: loads racing each other), else the
-- server had changed already (as 'lost'). op
-- 'lost:<id>': the caller saw epoch <id> and found the state lost since (Redis
-- restarted, failed over): a new epoch, and admits are held for RECOVERY_MS while every
-- node puts its calls back (P c '!hold'), unless another node did so already. op
-- 'missing:<id>': a caller that decided by the library found it gone and loaded it:
-- as 'lost' when the epoch is gone too (restarted empty), else only the library was
-- (the epoch follows the new mark). Returns the id.
local function epoch_op(op)
  local ekey = NS_PREFIX .. 'epoch'
  -- Every tick and load: the counts hash's field '#hashtable', a value longer than
  -- Redis's hash-max-listpack-value (64), so that Redis keeps the hash a hashtable, where
  -- a field is found in constant time. A small hash (up to hash-max-listpack-entries
  -- fields: 512 as Redis is built, 128 in its redis.conf) would otherwise be a listpack,
  -- searched field by field by every HMGET and HSET of the admit: a namespace of a few
  -- hundred values paid half as much again per admit. Kept, so that a hash loaded from
  -- an RDB file (where small hashes become listpacks again) or lost stays one too.
  redis.call('HSETNX', COUNTS, '#hashtable',
             'this field keeps the hash a hashtable: policer reads and writes it per call')
  local e = redis.call('HMGET', ekey, 'id', 'run')
  local cur = e[1]
  if op == '' then return cur or '' end
  -- (the library was loaded: what its records' attribute signature names)
  redis.call('HSET', NS_PREFIX .. 'sigs', ATTRS_SIG, ATTRS_NAMES)
  local renew, hold = false, false
  if op == 'init' then
    if cur then redis.call('HSET', ekey, 'run', vm_mark()) else renew = true end
  elseif string.sub(op, 1, 7) == 'reload:' then
    local mark, run = string.match(op, '^reload:([^:]*):?(.*)$')
    if not cur then
      renew = true
    elseif e[2] == mark or e[2] ~= run then
      redis.call('HSET', ekey, 'run', vm_mark())
    else
      renew, hold = true, true
    end
  elseif string.sub(op, 1, 8) == 'missing:' then
    -- the library was gone: with the epoch, only the library was (FUNCTION FLUSH);
    -- without it, the whole state (Redis restarted empty)
    if cur then
      redis.call('HSET', ekey, 'run', vm_mark())
    else
      renew, hold = true, true
    end
  elseif string.sub(op, 1, 5) == 'lost:' then
    renew = not cur or cur == string.sub(op, 6)
    hold = renew
  end
  if not renew then return cur or '' end
  cur = vm_mark() .. '-' .. NOW_S
  redis.call('HSET', ekey, 'id', cur, 'run', vm_mark())
  if hold then
    -- until when, in script time (a test moving the clock ends it)
    redis.call('HSET', COUNTS, '!hold', tostring(tonumber(NOW_S) + RECOVERY_MS))
  end
  return cur
end

-- Whether node (encoded) may start as instance inst: '' yes (it takes the node), else
-- 'owned:<ms>': another instance renewed the node's lease within one renew interval
-- and holds it now; ask again after <ms> (a crashed owner renews no more: then the
-- node is taken over).
local function take_node(node, inst, now, lease_end, renew_ms)
  local o = redis.call('HGET', NS_PREFIX .. 'owner', node)
  if o and lease_end and tonumber(lease_end) > now then
    local who, at = string.match(o, '^(.*):(%d+)$')
    if who and who ~= inst then
      local free_at = tonumber(at) + renew_ms + NODE_MARGIN_MS
      if free_at > now then return 'owned:' .. (free_at - now) end
    end
  end
  return ''
end

-- Leases are judged by Redis's clock, which moves on while Redis itself is stopped (a
-- pause, a stall, a restart from its AOF) and while every node is cut off: time in which
-- no node could renew. The time between two ticks of the namespace (any node's) beyond a
-- renew interval is such time: it is added to every lease that was alive at the earlier
-- tick, so that no node is judged lost for it (each node's own renewal follows within a
-- renew interval). A node that is gone for good lapses one lease after its last renewal
-- plus the time nobody could renew.
local function stall_credit(now, renew_ms)
  local tkey = NS_PREFIX .. 'ticked'
  local last = tonumber(redis.call('GET', tkey))
  redis.call('SET', tkey, NOW_S)
  if not last then return end
  local excess = now - last - renew_ms
  if excess <= 0 then return end
  local alive = redis.call('ZRANGEBYSCORE', NODES, '(' .. ns(last), '+inf')
  if #alive == 0 then return end
  local credit = ns(excess)
  for _, n in ipairs(alive) do redis.call('ZINCRBY', NODES, credit, n) end
  redis.call('HINCRBY', STATS, 'stall_ms', credit)
end

local function fn_tick(keys, args)
  local node = args[1] or ''
  local lease = tonumber(args[2]) or 0
  local batch = tonumber(args[5]) or 200
  local now = now_ms(args[6])
  local inst = args[9] or ''
  local renew_ms = tonumber(args[10]) or 5000
  if args[3] == 'epoch' then return {0, 0, 0, 0, epoch_op(args[8] or ''), '', 0} end
  local owner, lapsed = '', 0
  if lease > 0 then
    stall_credit(now, renew_ms)
    local was = redis.call('ZSCORE', NODES, node)
    if inst ~= '' then
      if args[3] == 'start' then
        owner = take_node(node, inst, now, was, renew_ms)
        if owner ~= '' then
          return {0, 0, 0, 0, epoch_op(''), owner, 0}
        end
      elseif not was or tonumber(was) <= now then
        -- the lease had lapsed (this node was cut off or stalled longer than the lease):
        -- the other nodes may have ended its calls; the caller puts them back
        lapsed = 1
      end
      redis.call('HSET', NS_PREFIX .. 'owner', node, inst .. ':' .. NOW_S)
    end
    redis.call('ZADD', NODES, now + lease, node)
    redis.call('SADD', NIDX, node)
  end
  if args[7] and args[7] ~= '' and node ~= '' then
    -- the node's clock minus Redis's (ms), as the node measured it, and when
    redis.call('HSET', NS_PREFIX .. 'skew', node, args[7] .. ':' .. NOW_S)
  end
  local epoch = epoch_op(args[8] or '')
  local left = 0
  if args[3] == 'start' then
    local nkey = P_NODE .. node
    local ids = redis.call('ZRANGE', nkey, 0, batch - 1)
    for _, did in ipairs(ids) do
      if not end_dialog(did, 'node_restarted', now) then
        redis.call('ZREM', nkey, did)
      end
    end
    left = redis.call('ZCARD', nkey)
  end
  local swept = 0
  if args[4] == '1' then swept = sweep_lost_nodes(now, batch) end
  local expired = sweep_expired(now, batch)
  local stale = sweep_state(now, batch)
  if #FRAUD > 0 then stale = stale + FR.sweep(now, batch) end
  delta_flush()
  return {swept, left, expired, stale, epoch, owner, lapsed}
end

