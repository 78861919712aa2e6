-- ------------------------------------------------------------------ dialogs
-- A dialog's record (P d:<dialog id>, one string: DIALOG of policer.protocol), its counts
-- in P c, its node's index (P n:<node>), its answer and its end. Counts change in one
-- function call by deltas gathered in DELTA and written once (delta_flush): one HMGET
-- and one HSET for a whole batch of ends. An answer and an end read and rewrite only
-- the record's leading fields (rec_answer, rec_end), the rest as it is.

local DELTA = {}
local DELTA_N = 0
local ENDED = {}  -- reason -> dialogs ended in this call (P stats ended:<reason>)

local function delta_add(fields_s, d)
  for f in string.gmatch(fields_s, '[^,]+') do
    local v = DELTA[f]
    if v == nil then DELTA_N = DELTA_N + 1; DELTA[f] = d else DELTA[f] = v + d end
  end
end

local function delta_one(f, d)
  local v = DELTA[f]
  if v == nil then DELTA_N = DELTA_N + 1; DELTA[f] = d else DELTA[f] = v + d end
end

-- Write the gathered deltas (a count never goes below 0; a field at 0 is removed) and the
-- ended counters.
local function delta_flush()
  if DELTA_N > 0 then
    local names = {}
    for f, _ in pairs(DELTA) do names[#names + 1] = f end
    local old = redis.call('HMGET', COUNTS, unpack(names))
    local set, del = {}, {}
    for i = 1, #names do
      local v = (num(old[i]) or 0) + DELTA[names[i]]
      if v > 0 then
        set[#set + 1] = names[i]
        set[#set + 1] = ns(v)
      elseif old[i] then
        del[#del + 1] = names[i]
      end
    end
    if #set > 0 then redis.call('HSET', COUNTS, unpack(set)) end
    if #del > 0 then redis.call('HDEL', COUNTS, unpack(del)) end
    DELTA = {}
    DELTA_N = 0
  end
  for reason, n in pairs(ENDED) do
    redis.call('HINCRBY', STATS, 'ended:' .. reason, ns(n))
  end
  ENDED = {}
end

local function live_state(state)
  return state == 'early' or state == 'confirmed'
end

local function is_live(rec)
  return live_state(rec.state)
end

-- a > b for the decimal strings of two non-negative integers (no strtod: deadlines are
-- compared as they are stored)
local function later(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

-- When a record itself goes (script time; its key's TTL goes with real time): a live
-- one GRACE_MS after its deadline, the release of a dialog the store did not know
-- EARLY_MS after it, any other DECIDED_MS after its decision or end.
local function expires_of(rec)
  local t = tonumber(rec.deadline) or 0
  if is_live(rec) then return t + GRACE_MS end
  if rec.state == 'gone' then return t + EARLY_MS end
  return t + DECIDED_MS
end

-- Drop a dialog's record, and what it still counts when it was live: a record decided
-- anew, or one that outlived its end in script time (only when a test moves the clock).
local function forget(did, rec)
  if is_live(rec) then
    delta_add(rec.members, -1)
    if rec.state == 'confirmed' then delta_one('#confirmed', -1) end
    redis.call('ZREM', P_NODE .. rec.node, did)
    delta_flush()
  end
  redis.call('DEL', P_DIALOG .. did)
  if rec.vars == '1' then redis.call('DEL', P_VARS .. did) end
end

-- A dialog's record, or nil (none, or one that outlived its end in script time: then it
-- is forgotten).
local function get_record(did, now)
  local raw = redis.call('GET', P_DIALOG .. did)
  if not raw then return nil end
  local rec = rec_unpack(raw)
  if rec == nil then return nil end
  if expires_of(rec) <= now then
    forget(did, rec)
    return nil
  end
  return rec
end

-- (every field a string; ttl_s: the key's TTL in ms, a string)
local function put_record(did, r, ttl_s)
  redis.call('SET', P_DIALOG .. did,
             rec_pack(r.state, r.deadline, r.start, r.cap, r.md, r.reason, r.node, r.vars,
                      r.members, r.init, r.q, r.class, r.sig, r.decision, r.tail),
             'PX', ttl_s)
end

-- Answer (confirm) or refresh a live dialog: push its deadline on to now + timeout,
-- never past its max duration (cap: answered + md). 1 when live. The node's index keeps
-- the dialog's earlier deadline: a sweep that finds it passed reads the record and moves
-- the dialog on (sweep_expired), so an answer writes only the record.
local function extend(did, confirm, timeout, now)
  local key = P_DIALOG .. did
  local raw = redis.call('GET', key)
  if not raw then return 0 end
  local state, dl, start, cap, md, rest = rec_answer(raw)
  -- past its deadline it stops counting at the next sweep and its slot may be taken:
  -- never revived
  if state == nil or not live_state(state) then return 0 end
  if not later(dl, NOW_S) then
    -- (one that outlived its end in script time, only when a test moves the clock, is
    -- forgotten)
    if not later(dl, NOW_GRACE_S) then forget(did, rec_unpack(raw)) end
    return 0
  end
  local deadline = now + timeout
  local capn = 0
  if cap ~= '0' then capn = tonumber(cap) end
  if capn == 0 and (confirm or state == 'confirmed') and md ~= '-1' then
    -- answered: it ends at its max duration, counted from the answer
    capn = now + tonumber(md)
    cap = ns(capn)
  end
  if capn > 0 and capn < deadline then deadline = capn end
  -- an answer within the dialog timeout keeps the key's TTL (a live record's key lives
  -- EARLY_MS + DIALOG_MS + KEEP_MS from its admission)
  local keep = confirm and state == 'early' and timeout <= DIALOG_MS
  if confirm and state == 'early' then
    state = 'confirmed'
    start = NOW_S
    delta_one('#confirmed', 1)
  end
  dl = ns(deadline)
  if keep then
    redis.call('SET', key, rec_answer_pack(state, dl, start, cap, md, rest), 'KEEPTTL')
  else
    redis.call('SET', key, rec_answer_pack(state, dl, start, cap, md, rest),
               'PX', ns(deadline - now + KEEP_MS))
  end
  return 1
end

-- The dialog's variables, packed ('<len>:<name><len>:<value>'...), '' none.
local function vars_of(did)
  local kv = redis.call('HGETALL', P_VARS .. did)
  local out = {}
  for i = 1, #kv do out[i] = #kv[i] .. ':' .. kv[i] end
  return table.concat(out)
end

local function set_var(did, name, value, now)
  local rec = get_record(did, now)
  if rec == nil or not is_live(rec) then return 0 end
  redis.call('HSET', P_VARS .. did, name, value)
  if rec.vars ~= '1' then
    rec.vars = '1'
    local ttl = ns(tonumber(rec.deadline) - now + KEEP_MS)
    put_record(did, rec, ttl)
    redis.call('PEXPIRE', P_VARS .. did, ttl)
  end
  return 1
end

-- A release of a dialog the store does not know: its admission may still be on its way
-- (a call the fallback admitted, queued in another worker, process or proxy). The
-- release wins: a record that arrives later finds the dialog gone and counts nothing.
-- Kept as long as such a record could still count (EARLY_MS).
local function tombstone(did, reason)
  redis.call('SET', P_DIALOG .. did,
             rec_pack('gone', NOW_S, '0', '0', '-1', reason, '', '', '', '0', '0', '', '',
                      '', ''), 'PX', EARLY_S)
end

-- End one live dialog: its counts drop (gathered: delta_flush), it leaves its node's
-- index, and (CDR_KEEP > 0, not quiet) its call-end record is written: d dialog id, r
-- reason, e when (ms), x its record as it was, a when it was answered (answered in this
-- batch, which its record does not show yet), v its variables. Returns the call-end
-- record as a flat list {record id, field, value, ...} ({} when records are off or
-- quiet), nil when the dialog was not live; and whether its deadline was still ahead.
-- tomb: a dialog the store does not know stays gone (tombstone).
local function end_dialog(did, reason, now, answered_at, quiet, tomb)
  local key = P_DIALOG .. did
  local raw = redis.call('GET', key)
  if not raw then
    if tomb then tombstone(did, reason) end
    return nil
  end
  local state, dl, start, cap, md, _, node, vars, members, rest = rec_end(raw)
  if state == nil or not live_state(state) then
    -- decided or ended already; a record that outlived its end in script time (only
    -- when a test moves the clock) is as none
    if tomb and (state == nil or expires_of(rec_unpack(raw) or EMPTY) <= now) then
      tombstone(did, reason)
    end
    return nil
  end
  delta_add(members, -1)
  if state == 'confirmed' then delta_one('#confirmed', -1) end
  redis.call('ZREM', P_NODE .. node, did)
  if not later(dl, NOW_GRACE_S) then
    -- it outlived its end in script time (only when a test moves the clock): forgotten,
    -- as a dialog the store does not know
    if vars == '1' then redis.call('DEL', P_VARS .. did) end
    if tomb then tombstone(did, reason) else redis.call('DEL', key) end
    return nil
  end
  local ahead = later(dl, NOW_S)
  local answered = nil
  if answered_at and state == 'early' and ahead then answered = answered_at end
  -- an answered call that ended short: the fraud rules' short calls
  local began = answered or start
  if FR.UNDER > 0 and began and began ~= '0' and began ~= '' then FR.short(raw, began, now) end
  local v = ''
  if vars == '1' then
    v = vars_of(did)
    redis.call('PEXPIRE', P_VARS .. did, DECIDED_S)
  end
  -- kept briefly so that late retransmissions see the dialog as decided, not as new
  redis.call('SET', key, rec_end_pack('ended', NOW_S, answered or start, cap, md, reason,
                                      node, vars, members, rest), 'PX', DECIDED_S)
  ENDED[reason] = (ENDED[reason] or 0) + 1
  if CDR_KEEP <= 0 or quiet then return EMPTY, ahead end
  local out = {'d', did, 'r', reason, 'e', NOW_S, 'x', raw}
  if answered then out[9] = 'a'; out[10] = answered end
  if v ~= '' then out[#out + 1] = 'v'; out[#out + 1] = v end
  local id = redis.call('XADD', CDR, 'MAXLEN', '~', CDR_KEEP_S, '*', unpack(out))
  table.insert(out, 1, id)
  return out, ahead
end

-- A request its caller gave up on and decided by its fallback (which rejected the
-- call): settled so that it never counts. rq: that request's deadline (Redis's clock).
-- A dialog it admitted anyway (Redis answered in time, the answer came too late) ends
-- quietly (reason abandoned, no call-end record: there was no call); a request that has
-- not arrived yet finds the dialog void and writes nothing. 1 when it changed something.
local function void(did, rq, now)
  rq = tonumber(rq)
  if rq == nil then return 0 end
  local rec = get_record(did, now)
  if rec and is_live(rec) then
    -- only the request that was given up on (or an older one): a later attempt's dialog
    -- (the INVITE re-sent and admitted since) stays
    local q = tonumber(rec.q) or 0
    if q == 0 or q > rq then return 0 end
    end_dialog(did, 'abandoned', now, nil, true)
    return 1
  end
  -- rejected, ended or gone: counts nothing
  if rec and rec.state ~= 'void' then return 0 end
  if rec and (tonumber(rec.q) or 0) >= rq then return 0 end
  redis.call('SET', P_DIALOG .. did,
             rec_pack('void', NOW_S, '0', '0', '-1', '', '', '', '', '0', ns(rq), '', '', '',
                      ''), 'PX', DECIDED_S)
  return 1
end
