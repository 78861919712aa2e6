-- policer: the decision library, one per policy namespace, loaded with
-- FUNCTION LOAD REPLACE. policer.compile puts a shebang line and the policy's constants
-- (the block "compiled constants" below lists them) in front of this file.
--
-- Functions (S = the namespace as a function-name suffix). KEYS[1] is always P, the
-- namespace prefix 'policer:{ns}:', declared so that Redis Cluster routes the call;
-- the functions use the compiled NS_PREFIX (the same string), so no caller can reach
-- another namespace. Every key a function touches starts with P: it sits in P's slot.
--
-- policer_admit_S   one initial INVITE, from its raw SIP attributes (the hot path)
--   ARGV[1] node (encoded; '' = none)  ARGV[2] Call-ID  ARGV[3] From-tag (raw bytes)
--   ARGV[4] the attributes the policy reads, in ATTRS order, each '<byte length>:<bytes>'
--   ARGV[5] mode: 'a' admit (default) | 'A' admit for a node holding a lease (its tick
--           registers it; the reply is only its first ten entries and the max duration
--           in seconds, -1 none: what a proxy's cfg reads) | 'r' record a call the fallback admitted while Redis was down (joins
--           without a limit check) | 'e' explain (dry run, writes nothing)
--   ARGV[6] clock offset ms (tests; default 0)
--   ARGV[7] the caller's ATTRS_SIG (optional): a caller that packs the attributes of
--           another policy (a proxy's cfg generated before another policy was loaded)
--           gets an error reply, and decides by its fallback, instead of a decision
--           over misread attributes
--   ARGV[8] explain only: evaluate schedules and calendar windows this many ms from
--           now (explain --at), with the counts of now ('-' or '' none)
--   ARGV[9] ARGV[10] modes a and A: the caller's deadline in Redis's clock, as its clock
--           reads when it sends (s, a fraction allowed) and the ms to add (its measured
--           skew to Redis's clock and its budget); past it nothing is written and the
--           reply is the error 'POLICER late ...' (missing or malformed: no deadline)
--   An error 'POLICER recovering ...' while P hold is ahead (Redis lost its state: the
--   nodes are putting their calls back; the caller's fallback decides).
--   Reply (the cfg reads the first four):
--     1 admitted (1|0)  2 SIP code  3 reason  4 Retry-After (-1 none)
--     5 profile of the tripped (or bypassed, or shadow) limit ('' none)  6 its count
--     7 its max  8 bypass (1|0)  9 duplicate (1|0)  10 shadow member (0 none)
--     11 tripped member (0 none)  12 number class ('' none)  13 memberships, '\n'-joined
--     14 dialog id  15 emergency (1|0)  16 kind of the tripped (or bypassed, or shadow)
--     limit: 'concurrent' | 'rate' | 'calls' ('' none)  17 its calendar window ('1d',
--     '' none)  18 the call's max duration (ms, -1 none)
--     A rate or calls rejection's count/max are the calls owed/the burst, the window's
--     count/its cap; its Retry-After the seconds until a call would pass (>= 1).
--     explain adds per member (12 values): profile, encoded value, count, max, effective
--     max, live limit (1|0), shadow (1|0), would trip (1|0), calls owed to its rate (-1
--     no rate), the rate's burst (-1), its windows ('per:count:max' lines), trip kind
--
-- policer_admitm_S  the same decision over explicit memberships (the store contract,
--   the test oracle's calling convention)
--   ARGV[1] dialog id (encoded)  ARGV[2] early timeout ms  ARGV[3] 0 ordinary, 1 emergency
--   (may use the reserve), 2 emergency with bypass, 3 record (no limit checked)
--   ARGV[4] n members  ARGV[5] clock offset ms  ARGV[6] node (encoded)
--   then per member (6 values): profile, valued (1|0), encoded value, max (-1 none),
--   reserve, shadow (1|0); then info pairs (field, value). Reply as policer_admit_S.
--
-- policer_batch_S   answers, ends and other dialog events, many in one call
--   ARGV[1] ops, concatenated; each op is one letter and its fields, each field
--   '<byte length>:<bytes>':
--     c Call-ID From-tag ms      confirm (answered; ms '' = the policy's dialog timeout)
--     f Call-ID From-tag ms      refresh (push the deadline to now + ms)
--     r Call-ID From-tag reason  release (idempotent)
--     u Call-ID tag1 tag2        release 'bye' by the first tag that names a live dialog
--                                (a BYE of a dialog another proxy set up)
--     v Call-ID From-tag name value   set a dialog variable
--     a node Call-ID From-tag attrs   record a call the fallback admitted
--     b node Call-ID From-tag attrs s add   the same, decided at s*1000+add (Redis's
--                                clock): it counts until that + EARLY_MS
--     x Call-ID From-tag s add   void: the fallback rejected the call after its admit
--                                with the deadline s*1000+add timed out; that request
--                                never counts (a dialog it admitted leaves its profiles,
--                                reason abandoned, no call-end record)
--     X dialog-id s add          the same by the encoded dialog id
--     C F R V: like c f r v with one field, the encoded dialog id, for the first two
--   ARGV[2] 1: reply with call-end records  ARGV[3] clock offset ms
--   ARGV[4] the caller's ATTRS_SIG (optional): on a mismatch the 'a' ops (whose
--   attributes it packed) are not applied (reply 0), the others are
--   Reply: one entry per op: 1|0 (c f v, a: 1 when newly counted), for r u R the
--   call-end record {record id, field, value, ...} (with ARGV[2] = 1) or 1, or 0 when
--   the dialog was not live.
--
-- policer_tick_S    a node's periodic duties (never per INVITE)
--   ARGV[1] node (encoded; '' = none)  ARGV[2] lease ms (0 = the node holds no lease)
--   ARGV[3] 'renew' | 'start' (the node starts afresh: its earlier dialogs end, reason
--   node_restarted, `batch` at a time)  ARGV[4] end dialogs of lost nodes (1|0)
--   ('epoch': only the epoch op of ARGV[8])
--   ARGV[5] batch (dialogs ended at most per kind)  ARGV[6] clock offset ms
--   ARGV[7] the node's clock minus Redis's, ms ('' unknown): kept in P skew
--   ARGV[8] the state epoch op: '' | 'init' | 'reload:<mark>' | 'missing:<id>' |
--           'lost:<id>' (see epoch_op)
--   ARGV[9] the renewing instance ('' none): a 'start' of a node another instance renewed
--           within ARGV[10] ms (its renew interval) + NODE_MARGIN_MS is refused
--   Reply: {dialogs of lost nodes ended, own dialogs still to end, expired dialogs ended,
--   stale rate/window state fields removed, the epoch id, '' or 'owned:<ms to wait>',
--   1 when the node's lease had lapsed before this renewal}
--
-- policer_read_S    read-only (no-writes: also on replicas)
--   ARGV[1] 'size': ARGV[2] clock offset, ARGV[3..] key suffixes (after P) of zsets;
--           reply: live members of each, then now (ms)
--   ARGV[1] 'info': ARGV[2] clock offset; reply {policy hash, policy source, policy
--           version, library format, now (ms), epoch id, epoch mark, this server's mark}
--
-- Data (P = 'policer:{ns}:'):
--   P d:<dialog id>  hash: decision, state, init_ms, start_ms, end_ms, deadline,
--                    expires, keys (its profile zsets), profiles (labels), n (node),
--                    i (Call-ID, From, To, class, node, source IP as '<len>:<bytes>'
--                    fields), tp (the tripped limit's profile), end_reason,
--                    vn (its variables' fields), v:<name>, cap (answered: it ends
--                    here at the latest: answer + the decision's max duration), q (the
--                    deadline of the request that admitted it); state also 'void' (q:
--                    the settled request's deadline) and 'ended' with no decision (the
--                    release of a dialog the store did not know: EARLY_MS)
--   P p:<profile>[:<value>]  zset dialog id -> deadline ms (counted: deadline ahead)
--   P l:<profile>    hash live limits, encoded value -> max; <enc>|L its live rate and
--                    window caps (',R=<max>:<per ms>:<burst>', ',<per>=<max>' items)
--   P t              hash rate and calendar state: '<profile>' or '<profile>:<enc>' ->
--                    '<TAT us>' then '|<per>=<window id>:<count>' per window
--   P sweep          string: the tick's HSCAN cursor over P t (stale state removed)
--   P n:<node>       zset every recorded dialog a node admitted -> deadline
--   P nidx           set of node names that have an n:<node> index
--   P nodes          zset node -> end of its lease (nodes holding a lease)
--   P confirmed      zset answered dialogs -> deadline
--   P stats          hash ended:<reason>, nodes_lost, resent_ended
--   P epoch          hash id, run (the VM_MARK it was confirmed with)
--   P hold           string until when admits are held (ms; PX RECOVERY_MS)
--   P owner          hash node -> '<instance>:<last renewal ms>'
--   P skew           hash node -> '<its clock minus Redis's, ms>:<when>'
--   P decisions      hash '<kind>;<result>|<profile>,...' -> decisions (one HINCRBY each)
--   P cdr            stream of call-end records (MAXLEN ~ CDR_KEEP)
--   P attempts       stream of decided attempts, one per dialog (MAXLEN ~ ATTEMPTS_KEEP):
--                    t (ms), d dialog id, r (a admitted, j rejected, f recorded after a
--                    fallback), rejected also c code, l limit, k kind; i (packed info as
--                    in P d:), a (the packed attributes), n (their sources, ','-joined)

-- ------------------------------------------------------------------ helpers

-- Numbers handed to redis.call are formatted with printf each time, which costs more
-- than most commands do: every number a call passes is made a string once (NOW_S, the
-- *_S constants below) and reused.
local NOW_S = ''
local ONE = '1'
local DECIDED_S = '' .. DECIDED_MS
local EARLY_TTL_S = '' .. (EARLY_MS + GRACE_MS)
local EARLY_S = '' .. EARLY_MS
local DIALOG_TTL_S = '' .. (DIALOG_MS + GRACE_MS)
local CDR_KEEP_S = '' .. CDR_KEEP
local ATTEMPTS_KEEP_S = '' .. ATTEMPTS_KEEP
local PLAIN_ADMIT = '1,0,0,-1,0,0,0'
local RECOVERY_S = '' .. RECOVERY_MS
-- ends the store decided on its own, which a node's record of the call overrides
local STORE_ENDS = {node_lost = true, expired = true}
-- the answer to an admit of a dialog that already ended (a late retransmission of a
-- cancelled call's INVITE, a re-sent Call-ID)
local ENDED_REJECT = {ENDED_CODE, ENDED_REASON}
-- a decision's tenth field, the call's max duration (ms; decide writes the fields)
local DECISION_MD = '^[^,]*,[^,]*,[^,]*,[^,]*,[^,]*,[^,]*,[^,]*,[^,]*,[^,]*,(%-?%d+)'

-- Redis's clock in ms, shifted by a test offset (0 in production); sets NOW_S.
local function now_ms(offset)
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + (tonumber(offset) or 0)
  NOW_S = tostring(ms)
  return ms
end

-- byte -> its percent-encoding, built on first use (string.* is not there at load time)
local PCT = nil

local function pct_table()
  local t = {}
  for b = 0, 255 do t[string.char(b)] = string.format('%%%02X', b) end
  return t
end

-- An untrusted value as part of a key: percent-encoded, so only [A-Za-z0-9_.@-%] remain
-- (no brace, separator, white space or newline); values longer than MAX_KEY_PART encoded
-- characters keep a prefix and end in '~' and the SHA-1 of the whole value ('~' itself is
-- always encoded, so no short value spells a long one's key). policer.call.key_part is
-- the same function, for reading.
local function key_part(v)
  if #v > MAX_VALUE_BYTES then v = string.sub(v, 1, MAX_VALUE_BYTES) end
  if #v <= MAX_KEY_PART and not string.find(v, '[^%w_%.@%-]') then return v end
  if PCT == nil then PCT = pct_table() end
  local e = string.gsub(v, '[^%w_%.@%-]', PCT)
  if #e <= MAX_KEY_PART then return e end
  return string.sub(e, 1, 64) .. '~' .. redis.sha1hex(v)
end

local function dialog_id(call_id, from_tag)
  return key_part(call_id) .. ';' .. key_part(from_tag)
end

-- '<len>:<bytes>' fields from position pos of s: returns the field and the next position
-- (nil when s ends or is malformed).
local function field_at(s, pos)
  local colon = string.find(s, ':', pos, true)
  if not colon or colon - pos > 9 then return nil, nil end
  local n = tonumber(string.sub(s, pos, colon - 1))
  if not n or n < 0 or colon + n > #s then return nil, nil end
  return string.sub(s, colon + 1, colon + n), colon + n + 1
end

-- a text value safe to keep and show: cut to MAX_VALUE_BYTES
local function bounded(v)
  if #v > MAX_VALUE_BYTES then return string.sub(v, 1, MAX_VALUE_BYTES) end
  return v
end

-- values as '<len>:<bytes>' fields, concatenated (what field_at reads)
local function pack(values)
  local out = {}
  for i = 1, #values do
    local v = values[i]
    out[i] = #v .. ':' .. v
  end
  return table.concat(out)
end

-- ------------------------------------------------------------------ local time

-- The UTC offset (ms) at UTC ms t: TZ_OFF[1] before TZ_AT[1], TZ_OFF[i + 1] from TZ_AT[i]
-- (the policy's timezone, compiled; UTC: no transitions).
local function tz_offset(t)
  local lo, hi, idx = 1, #TZ_AT, 0
  while lo <= hi do
    local mid = math.floor((lo + hi) / 2)
    if TZ_AT[mid] <= t then idx = mid; lo = mid + 1 else hi = mid - 1 end
  end
  return TZ_OFF[idx + 1]
end

-- minutes since local Monday 00:00 (1970-01-01 was a Thursday)
local function minute_of_week(t)
  local l = t + tz_offset(t)
  local days = math.floor(l / 86400000)
  return ((days + 3) % 7) * 1440 + math.floor((l % 86400000) / 60000)
end

-- days since 1970-01-01 <-> civil dates (H. Hinnant's algorithms)
local function civil(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  if m <= 2 then y = y + 1 end
  return y, m
end

local function days_from_civil(y, m)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m - 3
  if m <= 2 then mp = m + 9 end
  local doy = math.floor((153 * mp + 2) / 5)
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end

-- The calendar window `per` holding UTC ms t: its id (local ms of its start), its end
-- (UTC ms), its start (UTC ms). policer.calendar.LocalClock.window is the same
-- arithmetic.
local function window_of(per, t)
  local off = tz_offset(t)
  local l = t + off
  local s, e
  if per == '1m' then s = l - l % 60000; e = s + 60000
  elseif per == '1h' then s = l - l % 3600000; e = s + 3600000
  elseif per == '1d' then s = l - l % 86400000; e = s + 86400000
  elseif per == '7d' then
    local days = math.floor(l / 86400000)
    s = (days - (days + 3) % 7) * 86400000; e = s + 7 * 86400000
  else
    local y, m = civil(math.floor(l / 86400000))
    s = days_from_civil(y, m) * 86400000
    if m == 12 then y, m = y + 1, 1 else m = m + 1 end
    e = days_from_civil(y, m) * 86400000
  end
  return s, e - tz_offset(e - off), s - tz_offset(s - off)
end

local function in_schedule(iv, mow)
  for j = 1, #iv, 2 do
    if mow >= iv[j] and mow < iv[j + 1] then return true end
  end
  return false
end

-- The entry of a profile's limit that applies at local minute of week mow: the first
-- whose schedule matches (nil: none does, the profile is only counted then).
local function pick_entry(p, mow)
  local es = p.entries
  if not p.sched then return es[1] end
  for j = 1, #es do
    local e = es[j]
    if e.sched == nil or in_schedule(SCHED[e.sched], mow) then return e end
  end
  return nil
end

-- profiles by name (the answer of a repeated decision names its profile)
local PLAN_BY_NAME = {}
for i = 1, #PLAN do PLAN_BY_NAME[PLAN[i].name] = PLAN[i] end

-- ------------------------------------------------------------------ classification

local function number_class(num)
  local c = EXACT[num]
  if c then return c end
  for i = 1, #LENGTHS do
    local n = LENGTHS[i]
    if #num >= n then
      c = PREFIX[string.sub(num, 1, n)]
      if c then return c end
    end
  end
  return DEFAULT_CLASS
end

-- The call's memberships in policy order:
-- {prof, valued, enc, max, reserve, shadow, plan entry, limit entry (nil: none applies)}
-- at: the UTC ms schedules are evaluated at.
local function classify(attrs, at)
  local values = {}
  local pos = 1
  for i = 1, #ATTRS do
    local v, nxt = field_at(attrs, pos)
    if v == nil then break end
    values[i] = v
    pos = nxt
  end
  local number = values[NUMBER_ATTR] or ''
  local cls = number_class(number)
  local mow = 0
  if SCHEDULED then mow = minute_of_week(at) end
  local members = {}
  for i = 1, #PLAN do
    local p = PLAN[i]
    if p.when == nil or (cls and p.when[cls]) then
      local e = pick_entry(p, mow)
      local max, reserve, shadow = -1, 0, false
      if e then max, reserve, shadow = e.max, e.reserve, e.shadow end
      if p.attr == 0 then
        members[#members + 1] = {p.name, false, '', max, reserve, shadow, p, e}
      else
        local v = values[p.attr]
        if v and v ~= '' then  -- calls without a value join no count of that profile
          members[#members + 1] = {p.name, true, key_part(v), max, reserve, shadow, p, e}
        end
      end
    end
  end
  return cls, number, values, members
end

local function member_key(P, m)
  if m[2] then return P .. 'p:' .. m[1] .. ':' .. m[3] end
  return P .. 'p:' .. m[1]
end

local function member_label(m)
  if m[2] then return m[1] .. '=' .. m[3] end
  return m[1]
end

local function labels_of(members)
  local out = {}
  for i = 1, #members do out[i] = member_label(members[i]) end
  return table.concat(out, '\n')
end

-- The reject answer of a profile's limit: {code, reason, retry_after}
local function reject_of(profile)
  local r = REJECT_BY_PROFILE[profile]
  if r then return r end
  return DEFAULT_REJECT
end

-- Drop a dialog's record, and the memberships it still holds when it was live (state
-- early or confirmed): a record decided anew, or one that outlived its end in script
-- time (only when a test moves the clock).
local function forget(P, did, state)
  local dkey = P .. 'd:' .. did
  if state == 'early' or state == 'confirmed' then
    local old = redis.call('HMGET', dkey, 'keys', 'n')
    for zkey in string.gmatch(old[1] or '', '[^\n]+') do redis.call('ZREM', zkey, did) end
    if old[2] then redis.call('ZREM', P .. 'n:' .. old[2], did) end
    redis.call('ZREM', P .. 'confirmed', did)
  end
  redis.call('DEL', dkey)
end

-- ------------------------------------------------------------------ ending a dialog

-- End one live dialog: leave every profile, its node's index and the answered set,
-- count it, and (CDR_KEEP > 0) write its call-end record. Returns the record as a flat
-- list {record id, field, value, ...} (or {} when records are off), nil when the dialog
-- was not live; and whether its deadline was still ahead. answered_at: it was answered
-- then (in the same batch), which only its record shows.
local function end_dialog(P, did, reason, now, answered_at, quiet, tomb)
  local dkey = P .. 'd:' .. did
  local h = redis.call('HMGET', dkey, 'state', 'expires', 'keys', 'n', 'init_ms',
                       'start_ms', 'profiles', 'i', 'vn', 'deadline')
  local state = h[1]
  -- the record outlived its end in script time (only when a test moves the clock)
  local gone = not state or tonumber(h[2] or 0) <= now
  if tomb and gone then
    if state then forget(P, did, state) end
    -- A release of a dialog the store does not know: its admission may still be on its
    -- way (a call the fallback admitted, queued in another worker, process or proxy).
    -- The release wins: a record that arrives later finds the dialog ended and counts
    -- nothing. Kept as long as such a record could still count (EARLY_MS).
    redis.call('HSET', dkey, 'state', 'ended', 'end_ms', NOW_S, 'end_reason', reason,
               'expires', tostring(now + EARLY_MS))
    redis.call('PEXPIRE', dkey, EARLY_S)
    return nil
  end
  if gone or (state ~= 'early' and state ~= 'confirmed') then return nil end
  for zkey in string.gmatch(h[3] or '', '[^\n]+') do
    redis.call('ZREM', zkey, did)
  end
  if h[4] then redis.call('ZREM', P .. 'n:' .. h[4], did) end
  if state == 'confirmed' then redis.call('ZREM', P .. 'confirmed', did) end
  local start = h[6] or '0'
  local ahead = tonumber(h[10] or 0) > now
  -- kept briefly so that late retransmissions see the dialog as decided, not as new
  local expires = tostring(now + DECIDED_MS)
  if answered_at and state == 'early' and ahead then
    start = answered_at
    redis.call('HSET', dkey, 'state', 'ended', 'end_ms', NOW_S, 'end_reason', reason,
               'expires', expires, 'start_ms', start)
  else
    redis.call('HSET', dkey, 'state', 'ended', 'end_ms', NOW_S, 'end_reason', reason,
               'expires', expires)
  end
  redis.call('PEXPIRE', dkey, DECIDED_S)
  redis.call('HINCRBY', P .. 'stats', 'ended:' .. reason, ONE)
  if CDR_KEEP <= 0 or quiet then return {}, ahead end
  local rec = {'dialog_id', did, 'reason', reason, 'end_ms', NOW_S, 'init_ms', h[5] or '0',
               'start_ms', start, 'profiles', h[7] or '', 'i', h[8] or ''}
  if h[9] and h[9] ~= '' then
    local names = {}
    for f in string.gmatch(h[9], '[^\n]+') do names[#names + 1] = f end
    local vals = redis.call('HMGET', dkey, unpack(names))
    for i = 1, #names do
      if vals[i] then
        rec[#rec + 1] = names[i]
        rec[#rec + 1] = vals[i]
      end
    end
  end
  local id = redis.call('XADD', P .. 'cdr', 'MAXLEN', '~', CDR_KEEP_S, '*', unpack(rec))
  table.insert(rec, 1, id)
  return rec, ahead
end

-- ------------------------------------------------------------------ the decision

local FLAG_EMERGENCY, FLAG_BYPASS, FLAG_RECORD, FLAG_REGISTER = 1, 2, 4, 8
local KIND_NAMES = {'concurrent', 'rate', 'calls'}
local KIND_CODES = {concurrent = 1, rate = 2, calls = 3}

local function ceil_s(ms)
  local s = math.ceil(ms / 1000)
  if s < 1 then return 1 end
  return s
end

-- A member's live limits, from its profile's l: hash in one HMGET: <enc> live max,
-- <enc>|L live rate and window caps (',R=<max>:<per ms>:<burst>', ',<per>=<max>' items).
local function read_live(P, m)
  local enc = m[3]
  return redis.call('HMGET', P .. 'l:' .. m[1], enc, enc .. '|L')
end

-- A member's field in the P t hash of rate and calendar state: '<profile>' or
-- '<profile>:<enc>'; its value '<the rate's theoretical arrival time, us>' (empty without
-- a rate) then '|<per>=<window id>:<count>' per window.
local function state_field(m)
  local f = m[9]
  if f == nil then
    if m[2] then f = m[1] .. ':' .. m[3] else f = m[1] end
    m[9] = f
  end
  return f
end

-- The state of every member of the call that has a rate or windows (or live caps), in
-- one HMGET: field -> state
local function read_timed(P, members, lives)
  local names = {}
  for i = 1, #members do
    local m = members[i]
    local e = m[8]
    if (e and (e.T or e.win)) or (lives[i] and lives[i][2]) then
      names[#names + 1] = state_field(m)
    end
  end
  local out = {}
  if #names == 0 then return out end
  local r = redis.call('HMGET', P .. 't', unpack(names))
  for i = 1, #names do out[names[i]] = r[i] or '' end
  return out
end

-- The calendar window `per` at lnow: {id as written, end (UTC ms), its part of a state
-- field up to the count, start (UTC ms)}; computed once per window, not per call (the
-- library's upvalues live as long as it is loaded)
local WINDOWS_AT = {}

local function window_at(per, lnow)
  local w = WINDOWS_AT[per]
  if w and lnow >= w[4] and lnow < w[2] then return w end
  local id, wend, wstart = window_of(per, lnow)
  local ids = string.format('%d', id)
  w = {ids, wend, '|' .. per .. '=' .. ids .. ':', wstart}
  WINDOWS_AT[per] = w
  return w
end

-- A rate's check at now from its stored theoretical arrival time (tat_s, us as
-- written; '' none): the calls owed, the Retry-After in s when the call would be
-- rejected (-1: it passes), and the arrival time a call now moves it to, as written.
local function check_rate(T, tau, tat_s, now)
  local now_us = now * 1000
  local tat = tonumber(tat_s) or 0
  if tat < now_us then tat = now_us end
  local retry = -1
  if now_us < tat - tau then retry = ceil_s((tat - tau - now_us) / 1000) end
  return math.ceil((tat - now_us) / T), retry, string.format('%d', tat + T)
end

-- check_state's common case in fewer steps: an entry with at most two windows, no live
-- caps, and a state this entry wrote in the current windows (or none): one match of a
-- pattern that spells the current window ids (kept in the entry until a window
-- changes), one concatenation for the new state. Returns false when it does not apply
-- (a window boundary passed since the value's last call, another entry's state).
local function check_fast(e, state, now, lnow)
  local win = e.win
  local pat, w1, w2 = '^(%d*)$', nil, nil
  if win then
    w1 = window_at(win[1][1], lnow)
    if win[2] then
      w2 = window_at(win[2][1], lnow)
      if e.pid1 ~= w1[1] or e.pid2 ~= w2[1] then
        e.pat = '^(%d*)' .. w1[3] .. '(%d+)' .. w2[3] .. '(%d+)$'
        e.pid1, e.pid2 = w1[1], w2[1]
      end
    elseif e.pid1 ~= w1[1] then
      e.pat = '^(%d*)' .. w1[3] .. '(%d+)$'
      e.pid1 = w1[1]
    end
    pat = e.pat
  end
  local ts, n1, n2 = '', nil, nil
  if state ~= '' then
    ts, n1, n2 = string.match(state, pat)
    if ts == nil then return false end
  end
  local T, burst = e.T, e.burst
  local kind, count, max, retry, window, owed = nil, 0, -1, -1, '', -1
  local new = ts  -- a rate that does not apply now keeps its time
  if T then
    owed, retry, new = check_rate(T, e.tau, ts, now)
    if retry ~= -1 then kind, count, max = 'rate', owed, burst end
  else
    burst = -1
  end
  if not win then return kind, count, max, retry, window, new, owed, burst, '' end
  local c1 = tonumber(n1) or 0
  local wj = win[1]
  if kind == nil and c1 >= wj[2] then
    kind, count, max, window, retry = 'calls', c1, wj[2], wj[1], ceil_s(w1[2] - lnow)
  end
  if not w2 then
    return kind, count, max, retry, window, new .. w1[3] .. (c1 + 1), owed, burst, ''
  end
  local c2 = tonumber(n2) or 0
  wj = win[2]
  if kind == nil and c2 >= wj[2] then
    kind, count, max, window, retry = 'calls', c2, wj[2], wj[1], ceil_s(w2[2] - lnow)
  end
  return kind, count, max, retry, window, new .. w1[3] .. (c1 + 1) .. w2[3] .. (c2 + 1),
         owed, burst, ''
end

-- Check a member's rate and calendar windows (L: its live caps, as read_live reads
-- them; state: its field of the t hash) at now (windows at lnow: explain --at).
-- Returns: trip kind (nil none), count, max shown, retry s, window, the new state (nil:
-- nothing to spend), owed calls (-1 no rate), burst (-1), windows as 'per:count:max'
-- lines (rows only).
local function check_state(e, L, state, now, lnow, want_rows)
  local T, tau, burst, win
  if e then T, tau, burst, win = e.T, e.tau, e.burst, e.win end
  if L then
    local a, b, c = string.match(L, ',R=(%d+):(%d+):(%d+)')
    if a then
      a, b, c = tonumber(a), tonumber(b), tonumber(c)
      T = math.floor(b * 1000 / a)
      if T < 1 then T = 1 end
      tau, burst = T * (c - 1), c
    end
  end
  if not T and not win then return nil, 0, -1, -1, '', nil, -1, -1, '' end
  state = state or ''
  local kind, count, max, retry, window, owed, shown = nil, 0, -1, -1, '', -1, ''
  local tat_old = string.match(state, '^%d*')
  local parts = {tat_old}  -- a rate that does not apply now keeps its time
  local kept = #tat_old  -- bytes of the old state this call rewrites
  if T then
    owed, retry, parts[1] = check_rate(T, tau, tat_old, now)
    if retry ~= -1 then kind, count, max = 'rate', owed, burst end
  else
    burst = -1
  end
  local mine = nil
  if win then
    local rows = nil
    if want_rows then rows = {} end
    for j = 1, #win do
      local wj = win[j]
      local per, wmax = wj[1], wj[2]
      if L then
        local lw = string.match(L, wj[4])
        if lw then wmax = tonumber(lw) end
      end
      local w = window_at(per, lnow)
      local n = 0
      local sid, sn = string.match(state, wj[3])
      if sid then
        kept = kept + #per + #sid + #sn + 3
        if sid == w[1] then n = tonumber(sn) end
      end
      if rows then rows[#rows + 1] = per .. ':' .. n .. ':' .. wmax end
      if kind == nil and n >= wmax then
        kind, count, max, window = 'calls', n, wmax, per
        retry = ceil_s(w[2] - lnow)
      end
      parts[#parts + 1] = w[3] .. (n + 1)
    end
    if rows then shown = table.concat(rows, '\n') end
    mine = win
  end
  if #state > kept then
    -- windows of another entry (a schedule switched, a live cap): kept as they are
    for per, v in string.gmatch(state, '|(%w+)=([%d:]+)') do
      local own = false
      if mine then
        for j = 1, #mine do
          if mine[j][1] == per then own = true; break end
        end
      end
      if not own then parts[#parts + 1] = '|' .. per .. '=' .. v end
    end
  end
  return kind, count, max, retry, window, table.concat(parts), owed, burst, shown
end

-- The answer to a rejection: {code, reason, retry} of the entry that tripped (its
-- rate_reject for rates), with the computed Retry-After of rates and windows.
local function answer_of(profile, e, kind, retry)
  local rej
  if e then
    if kind == 'rate' then rej = e.rrej else rej = e.rej end
  else
    rej = reject_of(profile)
  end
  if kind == 'rate' or kind == 'calls' then return rej[1], rej[2], retry end
  return rej[1], rej[2], rej[3]
end

-- Decide one dialog over its memberships and, unless dry, record it: all or none.
-- mode flags: FLAG_EMERGENCY may use reserves, FLAG_BYPASS admitted over every limit,
-- FLAG_RECORD joins without checking (a call the fallback admitted). lnow: the instant
-- calendar windows are read at (now, but for explain --at). md: the call's max
-- duration (ms, -1 none).
local function decide(P, did, members, flags, early_ms, node, info, now, cls, dry, lnow, md,
                      attrs, rq)
  local dkey = P .. 'd:' .. did
  local emergency = flags % 2 == 1
  local bypass_allowed = math.floor(flags / 2) % 2 == 1
  local record = math.floor(flags / FLAG_RECORD) % 2 == 1
  local register = flags >= FLAG_REGISTER
  local emergency_out = 0
  if emergency then emergency_out = 1 end

  if not dry then
    -- The same dialog again (retransmission, INVITE re-sent with credentials): same
    -- answer. 'expires' is when the record ends in script time (the key's TTL in real
    -- time): they differ only when a test moves the clock.
    local prev = redis.call('HMGET', dkey, 'decision', 'expires', 'state', 'q', 'end_reason')
    local st = prev[3]
    if st then
      local anew = tonumber(prev[2] or 0) <= now
      if anew then
      elseif st == 'void' then
        -- a request its caller gave up on, settled by the caller's fallback: this very
        -- request (or an older one) arrives late and writes nothing; a later attempt
        -- (the INVITE re-sent after the stall) is decided normally
        if record or rq == nil or tonumber(rq) > tonumber(prev[4] or 0) then anew = true
        else return nil end
      elseif st == 'ended' then
        -- the dialog is over: an emergency call is always decided (counted as a new
        -- call); a record arrives after the release (which wins); any other admit is a
        -- late retransmission of an ended (cancelled) call or a re-sent Call-ID:
        -- rejected, never admitted uncounted
        if (emergency and not record) or (record and STORE_ENDS[prev[5]]) then
          -- (a record of a call the store itself ended, its node lost or its deadline
          -- passed: the node says it is up, so it counts again)
          anew = true
        else
          if not record then redis.call('HINCRBY', P .. 'stats', 'resent_ended', ONE) end
          local c, rsn = ENDED_REJECT[1], ENDED_REJECT[2]
          return {0, c, rsn, -1, '', 0, -1, 0, 1, 0, 0, cls or '', labels_of(members), did,
                  emergency_out, 'ended', '', -1}
        end
      elseif st == 'rejected' and (emergency or record) then
        -- an emergency call is always decided, whatever an earlier attempt got; a call
        -- the proxy's fallback admitted is up, whatever Redis answered it too late
        anew = true
      end
      if not anew and prev[1] then
        local more = redis.call('HMGET', dkey, 'i', 'profiles', 'tp')
        local cls_was = ''
        local pos = 1
        for _ = 1, 4 do  -- the class is the fourth info field
          local v
          v, pos = field_at(more[1] or '', pos)
          if v == nil then break end
          cls_was = v
        end
        local r = {}
        for v in string.gmatch(prev[1], '[^,]+') do r[#r + 1] = v end
        -- r: admitted, tripped, count, max, bypass, shadow, emergency, kind, retry,
        -- max duration, entry, window
        local admitted = tonumber(r[1])
        local kind = KIND_NAMES[tonumber(r[8] or 0)] or ''
        local code, reason, retry, limit = 200, 'OK', -1, more[3] or ''
        if admitted == 0 then
          local p = PLAN_BY_NAME[limit]
          local e = p and p.entries[tonumber(r[11] or 1)]
          code, reason, retry = answer_of(limit, e, kind, tonumber(r[9] or -1))
        end
        return {admitted, code, reason, retry, limit, tonumber(r[3]), tonumber(r[4]),
                tonumber(r[5]), 1, tonumber(r[6]), tonumber(r[2]), cls_was, more[2] or '',
                did, tonumber(r[7] or 0), kind, r[12] or '', tonumber(r[10] or -1)}
      end
      -- decided anew (or the record outlived its end in script time, only when a test
      -- moves the clock): forget it and whatever memberships it still held
      forget(P, did, st)
    end
  end

  local n = #members
  local tripped, tcount, tmax, bypass, shadow = 0, 0, -1, 0, 0
  local tkind, tretry, twin = '', -1, ''
  local rows = {}
  local keys = {}
  local spend = {}
  local nochecks = record and not dry
  local tstate = nil  -- the members' rate and window state (read_timed), on first need
  local lives = {}  -- valued members' live limits (read_live)
  for i = 1, n do
    local m = members[i]
    local zkey = member_key(P, m)
    keys[i] = zkey
    local e = m[8]
    local timed = e and (e.T or e.win)
    local max, live, st = m[4], 0, nil
    if m[2] then  -- valued: its live limits
      st = lives[i]
      if st == nil then st = read_live(P, m); lives[i] = st end
      if st[1] then max = tonumber(st[1]); live = 1 end
    end
    local count, effective, kind = 0, max, nil
    if (max >= 0 and not nochecks) or dry then
      count = redis.call('ZCOUNT', zkey, '(' .. NOW_S, '+inf')
      if not emergency then effective = max - m[5] end
      if max >= 0 and count >= effective then kind = 'concurrent' end
    end
    local kcount, kmax, kretry, kwin = count, effective, -1, ''
    -- the rate and windows: checked unless concurrency already rejects this call
    -- (then nothing is spent anyway), and spent when it is admitted
    local owed, burst, shown = -1, -1, ''
    if (timed or (st and st[2])) and (kind == nil or dry or m[6] or bypass_allowed) then
      local L = nil
      if st then L = st[2] end
      if tstate == nil then
        -- the later members' live limits too (read now, not again below)
        for j = i + 1, n do
          if members[j][2] then lives[j] = read_live(P, members[j]) end
        end
        tstate = read_timed(P, members, lives)
      end
      local state = tstate[m[9]] or ''
      local k, c2, c3, c4, c5, new = false, nil, nil, nil, nil, nil
      if e and e.fast and not L and not dry then
        k, c2, c3, c4, c5, new, owed, burst, shown = check_fast(e, state, now, lnow)
      end
      if k == false then
        k, c2, c3, c4, c5, new, owed, burst, shown = check_state(e, L, state, now, lnow, dry)
      end
      if new then spend[i] = new end
      if kind == nil and k and not nochecks then
        kind, kcount, kmax, kretry, kwin = k, c2, c3, c4, c5
      end
    end
    if dry then
      local sh, tr, val = 0, 0, ''
      if m[6] then sh = 1 end
      if kind then tr = 1 end
      if m[2] then val = m[3] end
      rows[#rows + 1] = {m[1], val, count, max, effective, live, sh, tr, owed, burst, shown,
                         kind or ''}
    end
    if kind and not nochecks then
      if m[6] then
        if shadow == 0 then
          shadow = i
          if tripped == 0 then
            tcount, tmax, tkind, tretry, twin = kcount, kmax, kind, kretry, kwin
          end
        end
      elseif bypass_allowed then
        if tripped == 0 then
          if kind == 'concurrent' then kmax = max end
          tripped, tcount, tmax, tkind, tretry, twin = i, kcount, kmax, kind, kretry, kwin
        end
        bypass = 1
      elseif tripped == 0 then
        tripped, tcount, tmax, tkind, tretry, twin = i, kcount, kmax, kind, kretry, kwin
        if not dry then break end
      end
    end
  end

  local admitted = 1
  if tripped > 0 and bypass == 0 then admitted = 0 end
  local limit, lentry = '', nil
  if tripped > 0 then limit, lentry = members[tripped][1], members[tripped][8]
  elseif shadow > 0 then limit, lentry = members[shadow][1], members[shadow][8] end
  local labels = labels_of(members)
  local code, reason, retry = 200, 'OK', -1
  if admitted == 0 then
    code, reason, retry = answer_of(limit, lentry, tkind, tretry)
  end
  local reply = {admitted, code, reason, retry, limit, tcount, tmax, bypass, 0, shadow,
                 tripped, cls or '', labels, did, emergency_out, tkind, twin, md}
  if dry then
    for i = 1, #rows do
      for j = 1, 12 do reply[#reply + 1] = rows[i][j] end
    end
    return reply
  end
  local decision = PLAIN_ADMIT
  if tripped > 0 or shadow > 0 or emergency_out > 0 or tmax ~= -1 or md ~= -1 then
    local eidx = 1
    if lentry then eidx = lentry.idx end
    decision = table.concat({admitted, tripped, tcount, tmax, bypass, shadow, emergency_out,
                             KIND_CODES[tkind] or 0, tretry, md, eidx, twin}, ',')
  end

  local packed = pack(info)
  if admitted == 0 then
    -- remembered for the life of an INVITE transaction (64*T1); spends nothing
    redis.call('HSET', dkey, 'decision', decision, 'state', 'rejected', 'init_ms', NOW_S,
               'expires', tostring(now + DECIDED_MS), 'tp', limit, 'i', packed,
               'profiles', labels)
    redis.call('PEXPIRE', dkey, DECIDED_S)
    redis.call('HINCRBY', P .. 'decisions', 'rejected;rejected|' .. limit, ONE)
    if ATTEMPTS_KEEP > 0 and attrs then
      redis.call('XADD', P .. 'attempts', 'MAXLEN', '~', ATTEMPTS_KEEP_S, '*', 't', NOW_S,
                 'd', did, 'r', 'j', 'c', code, 'l', limit, 'k', tkind, 'i', packed,
                 'a', attrs, 'n', ATTRS_NAMES)
    end
    return reply
  end

  local deadline = now + early_ms
  local dl = tostring(deadline)
  local results = {}
  local tspend = nil
  for i = 1, n do
    redis.call('ZADD', keys[i], dl, did)
    if spend[i] then
      if tspend == nil then tspend = {} end
      tspend[#tspend + 1] = members[i][9]
      tspend[#tspend + 1] = spend[i]
    end
    local result = 'admitted'
    if record then
      result = 'store_error'
    elseif i == tripped then
      result = 'bypassed'
    elseif i == shadow then
      result = 'shadow_rejected'
    end
    results[i] = result .. '|' .. members[i][1]
  end
  if tspend then redis.call('HSET', P .. 't', unpack(tspend)) end
  -- the node's index of its dialogs (lease, expiry sweeps, the count of live dialogs)
  redis.call('ZADD', P .. 'n:' .. node, dl, did)
  if register then redis.call('SADD', P .. 'nidx', node) end
  if rq then
    -- q: the deadline of the request that admitted it (a fallback's void settles it)
    redis.call('HSET', dkey, 'decision', decision, 'state', 'early', 'init_ms', NOW_S,
               'deadline', dl, 'expires', tostring(deadline + GRACE_MS),
               'keys', table.concat(keys, '\n'), 'profiles', labels, 'n', node,
               'tp', limit, 'i', packed, 'q', rq)
  else
    redis.call('HSET', dkey, 'decision', decision, 'state', 'early', 'init_ms', NOW_S,
               'deadline', dl, 'expires', tostring(deadline + GRACE_MS),
               'keys', table.concat(keys, '\n'), 'profiles', labels, 'n', node,
               'tp', limit, 'i', packed)
  end
  if early_ms == EARLY_MS then
    redis.call('PEXPIRE', dkey, EARLY_TTL_S)
  else
    redis.call('PEXPIRE', dkey, tostring(early_ms + GRACE_MS))
  end
  local kind = 'admitted'
  if record then kind = 'recorded' end
  redis.call('HINCRBY', P .. 'decisions', kind .. ';' .. table.concat(results, ','), ONE)
  if ATTEMPTS_KEEP > 0 and attrs then
    -- one attempt per dialog (a duplicate returned above, a dry run wrote nothing); only
  -- calls from their raw attributes (admitm, explicit memberships, has none to replay)
    local r = 'a'
    if record then r = 'f' end
    redis.call('XADD', P .. 'attempts', 'MAXLEN', '~', ATTEMPTS_KEEP_S, '*', 't', NOW_S,
               'd', did, 'r', r, 'i', packed, 'a', attrs, 'n', ATTRS_NAMES)
  end
  return reply
end

-- The call's max duration (ms, -1 none): the smallest of its limits' and its class's.
local function max_duration(members, cls)
  local md = MD_DEFAULT
  if cls and MD_CLASS[cls] then md = MD_CLASS[cls] end
  for i = 1, #members do
    local e = members[i][8]
    if e and e.dur > 0 and (md < 0 or e.dur < md) then md = e.dur end
  end
  return md
end

-- ------------------------------------------------------------------ admit (raw call)

local function admit_call(P, node, call_id, from_tag, attrs, mode, now, at, early_ms, rq)
  local cls, number, values, members = classify(attrs, at)
  local flags = 0
  if cls ~= nil and cls == EMERGENCY_CLASS then
    flags = FLAG_EMERGENCY
    if EMERGENCY_BYPASS then flags = flags + FLAG_BYPASS end
  end
  if mode == 'r' then flags = flags + FLAG_RECORD end
  if mode ~= 'A' then flags = flags + FLAG_REGISTER end
  local did = dialog_id(call_id, from_tag)
  local info = {}
  if mode ~= 'e' then
    local fu, fd = values[FROM_USER_ATTR] or '', values[FROM_DOMAIN_ATTR] or ''
    local from = fu
    if fd ~= '' then from = fu .. '@' .. fd end
    info = {bounded(call_id), bounded(from), bounded(number), cls or '', node,
            bounded(values[SOURCE_IP_ATTR] or '')}
  end
  return decide(P, did, members, flags, early_ms or EARLY_MS, node, info, now, cls,
                mode == 'e', at, max_duration(members, cls), attrs, rq)
end

-- An instant in Redis's clock (ms) from a caller's clock: its time s (seconds, a
-- fraction allowed, as the caller's clock reads) plus add ms (the caller's measured
-- offset to Redis's clock, and its budget); nil when either is missing or malformed.
local function redis_ms(s, add)
  local a, b = tonumber(s), tonumber(add)
  if a == nil or b == nil then return nil end
  return math.floor(a * 1000 + b)
end

local function late_reply(now, rq)
  local when = 'its fallback settled it'
  if now > rq then when = 'it stopped waiting ' .. (now - rq) .. ' ms ago' end
  return redis.error_reply('POLICER late: the caller gave up on this admit (' .. when ..
                           '); nothing was written, its fallback decides')
end

local function fn_admit(keys, args)
  if args[7] and args[7] ~= '' and args[7] ~= ATTRS_SIG then
    return redis.error_reply('POLICER the call\'s attributes were packed for another ' ..
                             'policy (' .. args[7] .. ') than the one loaded (' .. ATTRS_SIG ..
                             ', ' .. POLICY_SOURCE .. '): load that policy with policer ' ..
                             'load, or give this caller the loaded one (a native proxy: ' ..
                             'regenerate its cfg, restart it)')
  end
  local now = now_ms(args[6])
  local mode = args[5] or 'a'
  local at = now
  local rq = nil
  if mode == 'e' then
    if args[8] then at = now + (tonumber(args[8]) or 0) end
  elseif mode ~= 'r' then
    -- a request its caller gave up on (Redis paused, slow, the reply lost) is never
    -- applied: past the caller's deadline nothing is written
    rq = redis_ms(args[9], args[10])
    if rq and now > rq then return late_reply(now, rq) end
    -- Redis lost its state and the proxies are putting their calls back: the counts
    -- are not whole yet, so no limit is decided on them (the callers' fallback decides)
    local hold = redis.call('GET', NS_PREFIX .. 'hold')
    if hold and tonumber(hold) > now then
      return redis.error_reply('POLICER recovering: the counts are being restored from ' ..
                               'the proxies after Redis lost its state; the caller\'s ' ..
                               'fallback decides for a few seconds')
    end
  end
  local rq_s = nil
  if rq then rq_s = string.format('%d', rq) end
  local r = admit_call(NS_PREFIX, args[1] or '', args[2] or '', args[3] or '', args[4] or '',
                       mode, now, at, nil, rq_s)
  if r == nil then return late_reply(now, rq or now) end
  if mode == 'A' then
    local md_s = -1
    if r[18] > 0 then md_s = math.ceil(r[18] / 1000) end
    return {r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], md_s}
  end
  return r
end

local function fn_admitm(keys, args)
  local P = NS_PREFIX
  local now = now_ms(args[5])
  local n = tonumber(args[4])
  local members = {}
  local at = 7
  for i = 1, n do
    local valued = args[at + 1] == '1'
    local shadow = args[at + 5] == '1'
    members[i] = {args[at], valued, args[at + 2], tonumber(args[at + 3]),
                  tonumber(args[at + 4]), shadow}
    at = at + 6
  end
  -- info: (field, value) pairs -> the packed info fields, in their order
  local given = {}
  for j = at, #args, 2 do given[args[j]] = args[j + 1] end
  local info = {given['call_id'] or '', given['from'] or '', given['to'] or '',
                given['class'] or '', given['node'] or '', given['source_ip'] or ''}
  local flags = tonumber(args[3])
  if flags == 3 then flags = FLAG_RECORD
  elseif flags == 2 then flags = FLAG_EMERGENCY + FLAG_BYPASS end
  flags = flags + FLAG_REGISTER
  return decide(P, args[1], members, flags, tonumber(args[2]), args[6] or '', info, now,
                nil, false, now, -1, nil)
end

-- ------------------------------------------------------------------ dialog events

-- confirm (answered) or refresh a live dialog: push its deadline on, never past its
-- max duration ('cap': answered + md). 1 when live.
local function extend(P, did, confirm, timeout, now)
  local dkey = P .. 'd:' .. did
  local h = redis.call('HMGET', dkey, 'state', 'deadline', 'keys', 'n', 'decision', 'cap')
  local state = h[1]
  if state ~= 'early' and state ~= 'confirmed' then return 0 end
  -- past its deadline the dialog stopped counting and its slot may be taken: never revive
  if tonumber(h[2] or 0) <= now then return 0 end
  local deadline = now + timeout
  local cap = nil
  if h[6] then
    cap = tonumber(h[6])
  elseif confirm or state == 'confirmed' then
    -- the call's max duration: the decision's tenth field (a plain admit has none)
    local md = tonumber(string.match(h[5] or '', DECISION_MD))
    if md and md > 0 then cap = now + md end
  end
  if cap and cap < deadline then deadline = cap end
  local dl = tostring(deadline)
  for zkey in string.gmatch(h[3] or '', '[^\n]+') do
    redis.call('ZADD', zkey, dl, did)
  end
  if h[4] then redis.call('ZADD', P .. 'n:' .. h[4], dl, did) end
  local expires = tostring(deadline + GRACE_MS)
  if confirm and state == 'early' then
    if cap then
      redis.call('HSET', dkey, 'state', 'confirmed', 'start_ms', NOW_S, 'deadline', dl,
                 'expires', expires, 'cap', tostring(cap))
    else
      redis.call('HSET', dkey, 'state', 'confirmed', 'start_ms', NOW_S, 'deadline', dl,
                 'expires', expires)
    end
  else
    redis.call('HSET', dkey, 'deadline', dl, 'expires', expires)
  end
  if confirm or state == 'confirmed' then
    redis.call('ZADD', P .. 'confirmed', dl, did)
  end
  if timeout == DIALOG_MS and deadline == now + timeout then
    redis.call('PEXPIRE', dkey, DIALOG_TTL_S)
  else
    redis.call('PEXPIRE', dkey, tostring(deadline - now + GRACE_MS))
  end
  return 1
end

local function set_var(P, did, name, value)
  local dkey = P .. 'd:' .. did
  local h = redis.call('HMGET', dkey, 'state', 'vn')
  if h[1] ~= 'early' and h[1] ~= 'confirmed' then return 0 end
  local f = 'v:' .. name
  local vn = h[2] or ''
  local known = false
  for x in string.gmatch(vn, '[^\n]+') do
    if x == f then known = true; break end
  end
  if not known then
    if vn == '' then vn = f else vn = vn .. '\n' .. f end
    redis.call('HSET', dkey, f, value, 'vn', vn)
  else
    redis.call('HSET', dkey, f, value)
  end
  return 1
end

local function released(rec, with_records)
  if rec == nil then return 0 end
  if with_records then return rec end
  return 1
end

-- A request its caller gave up on and decided by its fallback (which rejected the
-- call): settled so that it never counts. rq: that request's deadline (Redis's clock).
-- A dialog it admitted anyway (Redis answered in time, the answer came too late) leaves
-- its profiles (no call-end record: there was no call); a request that has not arrived
-- yet finds the dialog void and writes nothing. 1 when it changed something.
local function void(P, did, rq, now)
  local dkey = P .. 'd:' .. did
  local h = redis.call('HMGET', dkey, 'state', 'q', 'expires')
  local live = h[1] and tonumber(h[3] or 0) > now
  if h[1] and not live then forget(P, did, h[1]) end
  if live and (h[1] == 'early' or h[1] == 'confirmed') then
    -- only the request that was given up on (or an older one): a later attempt's
    -- dialog (the INVITE re-sent and admitted since) stays
    if not h[2] or tonumber(h[2]) > rq then return 0 end
    end_dialog(P, did, 'abandoned', now, nil, true)
    return 1
  end
  if live and h[1] ~= 'void' then return 0 end  -- rejected or ended: counts nothing
  if live and tonumber(h[2] or 0) >= rq then return 0 end
  redis.call('HSET', dkey, 'state', 'void', 'q', string.format('%d', rq),
             'expires', tostring(now + DECIDED_MS))
  redis.call('PEXPIRE', dkey, DECIDED_S)
  return 1
end

-- One op of a batch, read from position pos: {letter, dialog id, arg1, arg2, raw Call-ID}
-- and the next position; nil when the batch is malformed from here on.
local function read_op(ops, pos)
  local op = string.sub(ops, pos, pos)
  pos = pos + 1
  local a, b, c, d
  if op == 'c' or op == 'f' or op == 'r' or op == 'u' then
    a, pos = field_at(ops, pos); if a == nil then return nil end
    b, pos = field_at(ops, pos); if b == nil then return nil end
    c, pos = field_at(ops, pos); if c == nil then return nil end
    return {op, dialog_id(a, b), c, nil, a}, pos
  elseif op == 'C' or op == 'F' or op == 'R' then
    a, pos = field_at(ops, pos); if a == nil then return nil end
    b, pos = field_at(ops, pos); if b == nil then return nil end
    return {op, a, b}, pos
  elseif op == 'v' then
    a, pos = field_at(ops, pos); if a == nil then return nil end
    b, pos = field_at(ops, pos); if b == nil then return nil end
    c, pos = field_at(ops, pos); if c == nil then return nil end
    d, pos = field_at(ops, pos); if d == nil then return nil end
    return {op, dialog_id(a, b), c, d}, pos
  elseif op == 'V' then
    a, pos = field_at(ops, pos); if a == nil then return nil end
    c, pos = field_at(ops, pos); if c == nil then return nil end
    d, pos = field_at(ops, pos); if d == nil then return nil end
    return {op, a, c, d}, pos
  elseif op == 'a' or op == 'b' then
    a, pos = field_at(ops, pos); if a == nil then return nil end
    b, pos = field_at(ops, pos); if b == nil then return nil end
    c, pos = field_at(ops, pos); if c == nil then return nil end
    d, pos = field_at(ops, pos); if d == nil then return nil end
    if op == 'a' then return {op, a, b, c, d}, pos end
    local e, f
    e, pos = field_at(ops, pos); if e == nil then return nil end
    f, pos = field_at(ops, pos); if f == nil then return nil end
    return {op, a, b, c, d, redis_ms(e, f)}, pos
  elseif op == 'x' then
    a, pos = field_at(ops, pos); if a == nil then return nil end
    b, pos = field_at(ops, pos); if b == nil then return nil end
    c, pos = field_at(ops, pos); if c == nil then return nil end
    d, pos = field_at(ops, pos); if d == nil then return nil end
    return {op, dialog_id(a, b), redis_ms(c, d)}, pos
  elseif op == 'X' then
    a, pos = field_at(ops, pos); if a == nil then return nil end
    c, pos = field_at(ops, pos); if c == nil then return nil end
    d, pos = field_at(ops, pos); if d == nil then return nil end
    return {op, a, redis_ms(c, d)}, pos
  end
  return nil  -- malformed: the rest of the batch cannot be read
end

local function fn_batch(keys, args)
  local P = NS_PREFIX
  local ops = args[1] or ''
  local with_records = args[2] == '1'
  local now = now_ms(args[3])
  local records_ok = args[4] == nil or args[4] == '' or args[4] == ATTRS_SIG
  local list = {}
  local pos, len = 1, #ops
  while pos <= len do
    local op
    op, pos = read_op(ops, pos)
    if op == nil then break end
    list[#list + 1] = op
  end
  -- A call answered and ended within one batch (a short call): its answer needs no
  -- write of its own, the end records when it was answered.
  local ends = {}
  for i = 1, #list do
    local l = list[i][1]
    if l == 'r' or l == 'R' or l == 'u' then ends[list[i][2]] = i end
  end
  local answered = {}  -- dialog id -> when answered (its confirm's index in at[did])
  local at = {}
  local out = {}
  for i = 1, #list do
    local op = list[i]
    local l, did = op[1], op[2]
    local r = 0
    if l == 'c' or l == 'C' then
      local e = ends[did]
      if e and e > i then
        answered[did] = NOW_S
        at[did] = i
        r = 1
      else
        r = extend(P, did, true, tonumber(op[3]) or DIALOG_MS, now)
      end
    elseif l == 'f' or l == 'F' then
      r = extend(P, did, false, tonumber(op[3]) or DIALOG_MS, now)
    elseif l == 'r' or l == 'R' or l == 'u' then
      local rec, ahead
      if l == 'u' then  -- a BYE of a dialog another proxy set up: either tag may name it
        rec, ahead = end_dialog(P, did, 'bye', now, answered[did])
        if rec == nil then
          local other = nil
          if op[3] ~= '' then
            other = dialog_id(op[5], op[3])
            rec = end_dialog(P, other, 'bye', now)
          end
          if rec == nil then  -- neither is live: those not known (yet) stay ended
            end_dialog(P, did, 'bye', now, nil, false, true)
            if other then end_dialog(P, other, 'bye', now, nil, false, true) end
          end
        end
      else
        rec, ahead = end_dialog(P, did, op[3], now, answered[did], false, true)
      end
      -- the answer of this batch found the dialog live (as a confirm of its own would)?
      if at[did] and not (rec and ahead) then out[at[did]] = 0 end
      r = released(rec, with_records)
    elseif l == 'v' or l == 'V' then
      r = set_var(P, did, bounded(op[3]), bounded(op[4]))
    elseif (l == 'a' or l == 'b') and records_ok then
      -- a call the proxy's fallback admitted ('b': decided at op[6], Redis's clock): it
      -- counts from then until its early deadline, unless its release came first
      local early = nil
      if l == 'b' and op[6] then early = op[6] + EARLY_MS - now end
      if early == nil or early > 0 then
        local reply = admit_call(P, key_part(op[2]), op[3], op[4], op[5], 'r', now, now, early)
        if reply[9] == 1 then r = 0 else r = 1 end
      end
    elseif (l == 'x' or l == 'X') and op[3] then
      r = void(P, did, op[3], now)
    end
    out[#out + 1] = r
  end
  return out
end

-- ------------------------------------------------------------------ the tick

local function sweep_lost_nodes(P, now, batch)
  local done = 0
  local nodes = P .. 'nodes'
  local lost = redis.call('ZRANGEBYSCORE', nodes, '-inf', now, 'LIMIT', 0, 4)
  for _, node in ipairs(lost) do
    if done >= batch then break end
    local nkey = P .. 'n:' .. node
    local ids = redis.call('ZRANGE', nkey, 0, batch - done - 1)
    for _, did in ipairs(ids) do
      if end_dialog(P, did, 'node_lost', now) then
        done = done + 1
      else
        redis.call('ZREM', nkey, did)  -- ended or expired already
      end
    end
    if redis.call('ZCARD', nkey) == 0 then
      redis.call('ZREM', nodes, node)
      redis.call('SREM', P .. 'nidx', node)
      redis.call('HINCRBY', P .. 'stats', 'nodes_lost', 1)
    end
  end
  return done
end

-- Dialogs whose deadline passed (nobody ended them): end up to `batch` (reason
-- expired). Counting never sees them anyway; this frees their memberships.
local function sweep_expired(P, now, batch)
  local done = 0
  local leased = P .. 'nodes'
  for _, node in ipairs(redis.call('SMEMBERS', P .. 'nidx')) do
    if done >= batch then break end
    local nkey = P .. 'n:' .. node
    local ids = redis.call('ZRANGEBYSCORE', nkey, '-inf', now, 'LIMIT', 0, batch - done)
    for _, did in ipairs(ids) do
      local h = redis.call('HMGET', P .. 'd:' .. did, 'state', 'deadline', 'n', 'cap')
      -- (a dialog id admitted again since, by another node, is that node's now)
      local live = (h[1] == 'early' or h[1] == 'confirmed') and h[3] == node
      if live and tonumber(h[2]) > now then
        redis.call('ZADD', nkey, h[2], did)  -- answered or refreshed since: due later
      else
        -- an answered call that reached its max duration (no proxy ended it)
        local reason = 'expired'
        if h[4] and h[4] == h[2] then reason = 'duration_cap' end
        if live and end_dialog(P, did, reason, now) then done = done + 1 end
        redis.call('ZREM', nkey, did)
      end
    end
    if redis.call('EXISTS', nkey) == 0 and not redis.call('ZSCORE', leased, node) then
      redis.call('SREM', P .. 'nidx', node)
    end
  end
  return done
end

-- Rate and window state of values that went quiet: a rate whose owed time has passed
-- and windows that have ended say nothing a missing field would not. Walks the P t
-- hash, `batch` fields per tick, resuming where the last tick stopped (P sweep: the
-- HSCAN cursor). Live limits (l: hashes) stay.
local function sweep_state(P, now, batch)
  local skey = P .. 'sweep'
  local tkey = P .. 't'
  local res = redis.call('HSCAN', tkey, redis.call('GET', skey) or '0', 'COUNT', batch)
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
  if #del > 0 then redis.call('HDEL', tkey, unpack(del)) end
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
-- policer load into a Redis without the library). op 'reload:<mark>': the library was
-- just loaded again; the caller read <mark> before: the epoch follows the new mark if
-- it was confirmed with <mark>, else the server had changed already (as 'lost'). op
-- 'lost:<id>': the caller saw epoch <id> and found the state lost since (Redis
-- restarted, failed over): a new epoch, and admits are held for RECOVERY_MS while every
-- node puts its calls back (P hold), unless another node did so already. op
-- 'missing:<id>': a caller that decided by the library found it gone and loaded it:
-- as 'lost' when the epoch is gone too (restarted empty), else only the library was
-- (the epoch follows the new mark). Returns the id.
local function epoch_op(P, op)
  local ekey = P .. 'epoch'
  local e = redis.call('HMGET', ekey, 'id', 'run')
  local cur = e[1]
  if op == '' then return cur or '' end
  local renew, hold = false, false
  if op == 'init' then
    renew = not cur
  elseif string.sub(op, 1, 7) == 'reload:' then
    if not cur then
      renew = true
    elseif e[2] == string.sub(op, 8) then
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
    -- until when, in script time (a test moving the clock ends it), and the key's TTL
    redis.call('SET', P .. 'hold', tostring(tonumber(NOW_S) + RECOVERY_MS), 'PX', RECOVERY_S)
  end
  return cur
end

-- Whether node (encoded) may start as instance inst: '' yes (it takes the node), else
-- 'owned:<ms>': another instance renewed the node's lease within one renew interval
-- and holds it now; ask again after <ms> (a crashed owner renews no more: then the
-- node is taken over).
local function take_node(P, node, inst, now, lease_end, renew_ms)
  local o = redis.call('HGET', P .. 'owner', node)
  if o and lease_end and tonumber(lease_end) > now then
    local who, at = string.match(o, '^(.*):(%d+)$')
    if who and who ~= inst then
      local free_at = tonumber(at) + renew_ms + NODE_MARGIN_MS
      if free_at > now then return 'owned:' .. (free_at - now) end
    end
  end
  return ''
end

local function fn_tick(keys, args)
  local P = NS_PREFIX
  local node = args[1] or ''
  local lease = tonumber(args[2]) or 0
  local batch = tonumber(args[5]) or 200
  local now = now_ms(args[6])
  local inst = args[9] or ''
  local renew_ms = tonumber(args[10]) or 5000
  if args[3] == 'epoch' then return {0, 0, 0, 0, epoch_op(P, args[8] or ''), '', 0} end
  local owner, lapsed = '', 0
  if lease > 0 then
    local was = redis.call('ZSCORE', P .. 'nodes', node)
    if inst ~= '' then
      if args[3] == 'start' then
        owner = take_node(P, node, inst, now, was, renew_ms)
        if owner ~= '' then
          return {0, 0, 0, 0, epoch_op(P, ''), owner, 0}
        end
      elseif not was or tonumber(was) <= now then
        -- the lease had lapsed (this node was cut off or stalled longer than the lease):
        -- the other nodes may have ended its calls; the caller puts them back
        lapsed = 1
      end
      redis.call('HSET', P .. 'owner', node, inst .. ':' .. NOW_S)
    end
    redis.call('ZADD', P .. 'nodes', now + lease, node)
    redis.call('SADD', P .. 'nidx', node)
  end
  if args[7] and args[7] ~= '' and node ~= '' then
    -- the node's clock minus Redis's (ms), as the node measured it, and when
    redis.call('HSET', P .. 'skew', node, args[7] .. ':' .. NOW_S)
  end
  local epoch = epoch_op(P, args[8] or '')
  local left = 0
  if args[3] == 'start' then
    local nkey = P .. 'n:' .. node
    local ids = redis.call('ZRANGE', nkey, 0, batch - 1)
    for _, did in ipairs(ids) do
      if not end_dialog(P, did, 'node_restarted', now) then
        redis.call('ZREM', nkey, did)
      end
    end
    left = redis.call('ZCARD', nkey)
  end
  local swept = 0
  if args[4] == '1' then swept = sweep_lost_nodes(P, now, batch) end
  local expired = sweep_expired(P, now, batch)
  local stale = sweep_state(P, now, batch)
  return {swept, left, expired, stale, epoch, owner, lapsed}
end

-- ------------------------------------------------------------------ reads

local function fn_read(keys, args)
  local P = NS_PREFIX
  if args[1] == 'info' then
    -- with Redis's clock (the caller measures its offset), the state epoch and this
    -- server's VM_MARK (another one than the epoch's: the state may have been lost)
    local now = now_ms(args[2])
    local e = redis.call('HMGET', P .. 'epoch', 'id', 'run')
    return {POLICY_HASH, POLICY_SOURCE, POLICY_VERSION, LIBRARY_FORMAT, now, e[1] or '',
            e[2] or '', vm_mark()}
  end
  local now = now_ms(args[2])
  local out = {}
  for i = 3, #args do
    out[#out + 1] = redis.call('ZCOUNT', P .. args[i], '(' .. NOW_S, '+inf')
  end
  out[#out + 1] = now
  return out
end

redis.register_function('policer_admit_' .. SUFFIX, fn_admit)
redis.register_function('policer_admitm_' .. SUFFIX, fn_admitm)
redis.register_function('policer_batch_' .. SUFFIX, fn_batch)
redis.register_function('policer_tick_' .. SUFFIX, fn_tick)
redis.register_function{function_name = 'policer_read_' .. SUFFIX, callback = fn_read,
                        flags = {'no-writes'}}
