-- ------------------------------------------------------------------ dialogs
-- A dialog's record (P d:<dialog id>, one string: rec_pack / rec_unpack), its counts in
-- P c, its node's index (P n:<node>), its end. Counts change in one function call by
-- deltas gathered in DELTA and written once (delta_flush): one HMGET and one HSET for a
-- whole batch of ends.

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
      local v = (tonumber(old[i]) or 0) + DELTA[names[i]]
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

local function is_live(rec)
  return rec.state == 'early' or rec.state == 'confirmed'
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
             rec_pack(r.state, r.node, r.deadline, r.init, r.start, r.q, r.cap, r.reason,
                      r.class, r.sig, r.vars, r.members, r.decision, r.tail),
             'PX', ttl_s)
end

-- confirm (answered) or refresh a live dialog: push its deadline on, never past its max
-- duration (cap: answered + md). 1 when live.
local function extend(did, confirm, timeout, now)
  local rec = get_record(did, now)
  if rec == nil or not is_live(rec) then return 0 end
  -- past its deadline it stops counting at the next sweep and its slot may be taken:
  -- never revived
  if tonumber(rec.deadline) <= now then return 0 end
  local deadline = now + timeout
  local cap = tonumber(rec.cap) or 0
  if cap == 0 and (confirm or rec.state == 'confirmed') then
    -- the call's max duration, from its decision (a plain admit has none)
    local md = PLAIN_MD
    if rec.decision ~= PLAIN_DECISION then md = tonumber(dec_unpack(rec.decision).max_duration) end
    if md and md > 0 then cap = now + md end
  end
  if cap > 0 and cap < deadline then deadline = cap end
  if confirm and rec.state == 'early' then
    rec.state = 'confirmed'
    rec.start = NOW_S
    delta_one('#confirmed', 1)
  end
  rec.cap = ns(cap)
  local dl = ns(deadline)
  rec.deadline = dl
  put_record(did, rec, ns(deadline - now + KEEP_MS))
  redis.call('ZADD', P_NODE .. rec.node, dl, did)
  return 1
end

-- The dialog's variables, packed ('<len>:<name><len>:<value>'...), '' none.
local function vars_of(did, rec)
  if rec.vars ~= '1' then return '' end
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

-- End one live dialog: its counts drop (gathered: delta_flush), it leaves its node's
-- index, and (CDR_KEEP > 0, not quiet) its call-end record is written. Returns the
-- record as a flat list {record id, field, value, ...} ({} when records are off or
-- quiet), nil when the dialog was not live; and whether its deadline was still ahead.
-- answered_at: it was answered then (in the same batch), which only its record shows.
-- tomb: a dialog the store does not know stays ended (a record of it on its way from
-- another queue counts nothing).
local function end_dialog(did, reason, now, answered_at, quiet, tomb)
  local rec = get_record(did, now)
  if rec == nil then
    if tomb then
      -- A release of a dialog the store does not know: its admission may still be on its
      -- way (a call the fallback admitted, queued in another worker, process or proxy).
      -- The release wins: a record that arrives later finds the dialog ended and counts
      -- nothing. Kept as long as such a record could still count (EARLY_MS).
      redis.call('SET', P_DIALOG .. did,
                 rec_pack('gone', '', NOW_S, '0', '0', '0', '0', reason, '', '', '', '', '',
                          ''), 'PX', EARLY_S)
    end
    return nil
  end
  if not is_live(rec) then return nil end
  delta_add(rec.members, -1)
  if rec.state == 'confirmed' then delta_one('#confirmed', -1) end
  redis.call('ZREM', P_NODE .. rec.node, did)
  local ahead = tonumber(rec.deadline) > now
  if answered_at and rec.state == 'early' and ahead then rec.start = answered_at end
  local vars = vars_of(did, rec)
  local was = rec_pack(rec.state, rec.node, rec.deadline, rec.init, rec.start, rec.q,
                       rec.cap, reason, rec.class, rec.sig, rec.vars, rec.members,
                       rec.decision, rec.tail)
  -- kept briefly so that late retransmissions see the dialog as decided, not as new
  rec.state = 'ended'
  rec.reason = reason
  rec.deadline = NOW_S
  put_record(did, rec, DECIDED_S)
  if rec.vars == '1' then redis.call('PEXPIRE', P_VARS .. did, DECIDED_S) end
  ENDED[reason] = (ENDED[reason] or 0) + 1
  if CDR_KEEP <= 0 or quiet then return EMPTY, ahead end
  local out
  if vars ~= '' then
    out = {'d', did, 'r', reason, 'e', NOW_S, 'x', was, 'v', vars, 'n', ATTRS_NAMES}
  else
    out = {'d', did, 'r', reason, 'e', NOW_S, 'x', was, 'n', ATTRS_NAMES}
  end
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
             rec_pack('void', '', NOW_S, '0', '0', ns(rq), '0', '', '', '', '', '', '', ''),
             'PX', DECIDED_S)
  return 1
end
