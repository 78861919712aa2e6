-- ------------------------------------------------------------------ the decision
-- One dialog decided over its plan (its memberships) and, unless a dry run, recorded:
-- all or none. Every count, live limit and rate/window state a call needs is in P c and
-- read with one HMGET; the record is written with one SET NX (which finds a dialog
-- decided before); an admission writes the counts back with one HSET.

local FLAG_EMERGENCY, FLAG_BYPASS, FLAG_RECORD, FLAG_REGISTER, FLAG_HOLD = 1, 2, 4, 8, 16
-- what tripped, by its code in a decision record and back (one table: the library's top
-- level is at Lua's 200 locals)
local KIND = {names = {'concurrent', 'rate', 'calls', 'parent', 'fraud'},
              codes = {concurrent = 1, rate = 2, calls = 3, parent = 4, fraud = 5}}

-- The call being decided, set per call (the library's top level is at Lua's 200 locals:
-- one table): native, the reply is what a proxy's cfg reads (NATIVE_REPLY, mode A, set
-- by fn_admit), else ADMIT_REPLY; dir, the call's direction ('' none: the reply carries
-- it); gw, the call carries where it is sent (its gateway: the admit decides that first
-- attempt, the reply's egress 1 taken, 0 full); number, the dialled number (the fraud
-- rules count it). The reply's egress fields (egress, its
-- code, reason, Retry-After, limit, kind, count, max): EG.none, the admit did not decide
-- the call's gateway (none, a duplicate, a rejection); EG.taken, it took it.
local CALL = {native = false, dir = '', gw = false, number = ''}
local EG = {none = {-1, 0, '', -1, '', '', 0, -1}, taken = {1, 200, 'OK', -1, '', '', 0, -1}}
-- decide's answers besides a reply: admits are held (P c '!hold'); a live parent its
-- plan was built on changed (stale)
local ANSWER = {hold = {}, stale = {}}

local function reply(admitted, code, reason, retry, limit, count, max, bypass, dup, shadow,
                     tripped, cls, labels, did, emergency, kind, window, md, eg)
  eg = eg or EG.none
  if CALL.native then
    -- admitted with its gateway full: the code, reason and Retry-After are the gateway
    -- limit's (what the proxy answers when no other gateway has room)
    if eg[1] == 0 then code, reason, retry = eg[2], eg[3], eg[4] end
    return native_reply(admitted, code, reason, retry, bypass, shadow, md, did, eg[1])
  end
  if type(labels) == 'table' then labels = labels_of(labels) end
  return admit_reply(admitted, code, reason, retry, limit, count, max, bypass, dup, shadow,
                     tripped, cls, labels, did, emergency, kind, window, md, CALL.dir,
                     eg[1], eg[2], eg[3], eg[4], eg[5], eg[6], eg[7], eg[8])
end

-- The answer a dialog decided before gets again (a retransmission, the INVITE re-sent
-- with credentials): its decision as it was given.
local function repeated(did, rec, emergency_out)
  local d = dec_unpack(rec.decision)
  local admitted = tonumber(d.admitted)
  local kind = KIND.names[tonumber(d.kind) or 0] or ''
  local code, reason, retry, limit = 200, 'OK', -1, d.limit or ''
  if admitted == 0 then
    local p = PLAN_BY_NAME[limit]
    local e = p and entry_by_idx(p, tonumber(d.entry) or 1)
    code, reason, retry = answer_of(limit, e, kind, tonumber(d.retry) or -1)
  end
  return reply(admitted, code, reason, retry, limit, tonumber(d.count) or 0,
               tonumber(d.max) or -1, tonumber(d.bypass) or 0, 1, tonumber(d.shadow) or 0,
               tonumber(d.tripped) or 0, rec.class, labels_of_fields(rec.members), did,
               tonumber(d.emergency) or 0, kind, d.window or '',
               tonumber(d.max_duration) or -1)
end

-- A dialog decided before (its key was there: SET NX found it): its answer again (a
-- retransmission, the INVITE re-sent with credentials), nil (this request was settled
-- before it arrived), or false: it is decided anew (the record was forgotten, with
-- whatever it still counted).
local function existing(did, raw, record, emergency, emergency_out, rq, now, cls, members)
  local rec = rec_unpack(raw)
  local st = rec and rec.state
  local anew = rec == nil or expires_of(rec) <= now
  if anew then
  elseif st == 'void' then
    -- a request its caller gave up on, settled by the caller's fallback: this very
    -- request (or an older one) arrives late and writes nothing; a later attempt (the
    -- INVITE re-sent after the stall) is decided normally
    if record or rq == nil or tonumber(rq) > (tonumber(rec.q) or 0) then anew = true
    else return nil end
  elseif st == 'ended' or st == 'gone' then
    -- the dialog is over: an emergency call is always decided (counted as a new call);
    -- a record arriving after the release counts nothing (the release wins), unless the
    -- store ended the call itself (its node lost, its deadline passed: the node says it
    -- is up); any other admit is a late retransmission of an ended (cancelled) call or
    -- a re-sent Call-ID: rejected, never admitted uncounted
    if (emergency and not record) or (record and STORE_ENDS[rec.reason]) then
      anew = true
    else
      if not record then redis.call('HINCRBY', STATS, 'resent_ended', '1') end
      return reply(0, ENDED_CODE, ENDED_REASON, -1, '', 0, -1, 0, 1, 0, 0, cls, members, did,
                   emergency_out, 'ended', '', -1)
    end
  elseif st == 'rejected' and (emergency or record) then
    -- an emergency call is always decided, whatever an earlier attempt got; a call the
    -- proxy's fallback admitted is up, whatever Redis answered it too late
    anew = true
  end
  if not anew then return repeated(did, rec, emergency_out) end
  -- decided anew (or the record outlived its end in script time, only when a test moves
  -- the clock): forget it and whatever it still counts
  if rec then forget(did, rec) else redis.call('DEL', P_DIALOG .. did) end
  return false
end

-- One decided attempt in P attempts (one per dialog: a duplicate is answered before
-- anything is written, a dry run writes nothing).
local function attempt(did, result, cls, node, code, limit, kind, tail)
  if ATTEMPTS_KEEP <= 0 then return end
  redis.call('XADD', ATTEMPTS, 'MAXLEN', '~', ATTEMPTS_KEEP_S, '*', 'd', did,
             'a', attempt_pack(result, NOW_S, cls, node, ATTRS_SIG, code, limit, kind), 'x', tail)
end

-- The members of a plan checked over what its HMGET read (h), writing nothing: the
-- first member whose limit trips rejects (a dry run goes on, for its rows); a shadow
-- limit only reports (the first: shadow); an emergency call with the bypass is admitted
-- over every limit; nochecks (a record) trips nothing; a value whose parent is unknown,
-- at a level that rejects such calls (plan.missing), trips an ordinary call when nothing
-- else did (tripped -1, kind parent). Returns the tripped member (0 none, -1 the missing
-- parent), its count, max, kind, Retry-After and window, bypass (1|0), the shadow member
-- (0 none), each member's count, the states to spend (member -> state, nil none), a
-- dry run's rows, and with soft (an admit) the gateway's trip: a member whose value is
-- where the call is sent (p.gw) refuses that gateway, not the call ({member (-1 its
-- level's missing parent), count, max, kind, Retry-After, window}, nil none).
local function check_members(plan, h, emergency, bypass_allowed, nochecks, dry, now, lnow,
                             soft)
  local members = plan.members
  local n = #members
  local pos = plan.pos
  local tripped, tcount, tmax, bypass, shadow = 0, 0, -1, 0, 0
  local tkind, tretry, twin = '', -1, ''
  local rows = nil
  if dry then rows = {} end
  local gtrip = nil
  local spend = nil  -- member index -> its new rate/window state
  local counts = {}
  for i = 1, n do
    local m = members[i]
    local p, e, enc = m[1], m[2], m[3]
    local k = pos[i]
    local count = num(h[k]) or 0
    counts[i] = count
    local max, reserve, sh = -1, 0, false
    if e then max, reserve, sh = e.max, e.reserve, e.shadow end
    local live, L, state = 0, nil, nil
    if enc ~= '' then
      -- a value's live limits (L|): its live max, then its live caps' items (kept by the
      -- plan at the live version, or read with the counts)
      local lv
      if plan.lvals then lv = plan.lvals[i] else lv = live_of(h[plan.lpos[i]]) end
      if lv then
        if lv[1] then max = lv[1]; live = 1 end
        if lv[2] then L = lv[2] end
      end
    end
    local sp = plan.spos[i]
    if sp then
      state = h[sp] or ''
    elseif L then
      -- live caps on a value whose limit has none: its state, read only then
      state = redis.call('HGET', COUNTS, m[5][4]) or ''
    end
    local effective, kind = max, nil
    if not emergency then effective = max - reserve end
    if max >= 0 and not nochecks and count >= effective then kind = 'concurrent' end
    local kcount, kmax, kretry, kwin = count, effective, -1, ''
    -- the rate and windows: checked unless concurrency already rejects this call (then
    -- nothing is spent anyway), and spent when it is admitted
    local owed, burst, shown = -1, -1, ''
    if ((e and (e.T or e.win)) or L) and (kind == nil or dry or sh or bypass_allowed) then
      local r, c2, c3, c4, c5, new = false, nil, nil, nil, nil, nil
      if e and e.fast and not L and not dry then
        r, c2, c3, c4, c5, new, owed, burst, shown = check_fast(e, state, now, lnow)
      end
      if r == false then
        r, c2, c3, c4, c5, new, owed, burst, shown = check_state(e, L, state, now, lnow, dry)
      end
      if new then
        if spend == nil then spend = {} end
        spend[i] = new
      end
      if kind == nil and r and not nochecks then
        kind, kcount, kmax, kretry, kwin = r, c2, c3, c4, c5
      end
    end
    if dry then
      local tr = 0
      if kind then tr = 1 end
      local shw = 0
      if sh then shw = 1 end
      rows[#rows + 1] = explain_row(p.name, enc, count, max, effective, live, shw, tr, owed,
                                    burst, shown, kind or '')
    end
    if kind and not nochecks then
      if sh then
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
      elseif soft and p.gw then
        if gtrip == nil then gtrip = {i, kcount, kmax, kind, kretry, kwin} end
      elseif tripped == 0 then
        tripped, tcount, tmax, tkind, tretry, twin = i, kcount, kmax, kind, kretry, kwin
        if not dry then break end
      end
    end
  end

  if plan.missing and tripped == 0 and not emergency and not nochecks then
    if soft and plan.missing.gw then
      if gtrip == nil then gtrip = {-1, 0, -1, 'parent', -1, ''} end
    else
      tripped, tcount, tmax, tkind, tretry, twin, shadow = -1, 0, -1, 'parent', -1, '', 0
    end
  end
  return tripped, tcount, tmax, tkind, tretry, twin, bypass, shadow, counts, spend, rows,
         gtrip
end

-- The limit a decision over a plan names, and its entry: the tripped member's (the
-- missing parent's level), else the shadow member's; '' none.
local function named_limit(plan, tripped, shadow)
  local members = plan.members
  if tripped > 0 then return members[tripped][1].name, members[tripped][2] end
  if tripped < 0 then return plan.missing.name, plan.missing.entries[1] end
  if shadow == nil then return '', nil end
  if shadow > 0 then return members[shadow][1].name, members[shadow][2] end
  return '', nil
end

-- Decide one dialog over its plan (classify) and, unless dry, record it: all or none.
-- flags: FLAG_EMERGENCY may use reserves, FLAG_BYPASS admitted over every limit,
-- FLAG_RECORD joins without checking (a call the fallback admitted), FLAG_REGISTER adds
-- the node to P nidx, FLAG_HOLD: admits are held while P c's '!hold' is ahead (then the
-- answer is HOLD). lnow: the instant calendar windows and schedules are read at (now,
-- but for explain --at). rq: the deadline of the request (string), nil none. tail: the
-- record's packed Call-ID and attributes. One HMGET reads the counts; the record is
-- written with SET NX, which finds a dialog decided before (existing) before anything
-- else is written. Returns the reply, or nil: this request was settled (void) before it
-- arrived.
local function decide(did, plan, flags, early_ms, node, now, lnow, cls, dry, rq, tail, attrs)
  local members, md = plan.members, plan.md
  local emergency = flags % 2 == 1
  local bypass_allowed = math.floor(flags / 2) % 2 == 1
  local record = math.floor(flags / FLAG_RECORD) % 2 == 1
  local register = math.floor(flags / FLAG_REGISTER) % 2 == 1
  local hold = flags >= FLAG_HOLD
  local emergency_out = 0
  if emergency then emergency_out = 1 end

  local n = #members
  local h = redis.call('HMGET', COUNTS, unpack(plan.hm))
  if hold and h[1] and tonumber(h[1]) > now then return ANSWER.hold end
  if plan.vpos and h[plan.vpos] ~= plan.ver then return ANSWER.stale end
  local nochecks = record and not dry
  local tripped, tcount, tmax, tkind, tretry, twin, bypass, shadow, counts, spend, rows,
        gtrip = check_members(plan, h, emergency, bypass_allowed, nochecks, dry, now, lnow,
                              true)

  local admitted = 1
  if tripped ~= 0 and bypass == 0 then admitted = 0 end
  local limit, lentry = named_limit(plan, tripped, shadow)
  local code, reason, retry = 200, 'OK', -1
  -- the fraud rules (never over an emergency call, nor a call the fallback admitted): a
  -- block in force, or a call that makes a statistic critical, rejects with the rule's
  -- answer, whatever the limits said
  local frej, fw = nil, nil
  if plan.fraud and not emergency and not record then
    frej, fw = FR.check(plan, h, CALL.number, now, lnow, dry)
    if frej then
      admitted, bypass, tripped, shadow = 0, 0, 0, 0
      limit, lentry, tkind, tcount, tmax, twin = frej.name, nil, 'fraud', 0, -1, ''
      tretry = frej.rej[3]
    end
  end
  if admitted == 0 then code, reason, retry = answer_of(limit, lentry, tkind, tretry) end
  -- the call's first attempt: its gateway taken with the call, or full (the call is
  -- admitted without it: the proxy tries the next gateway, one egress call each)
  local eg, glimit = nil, nil
  if admitted == 1 and gtrip then
    local gentry
    glimit, gentry = named_limit(plan, gtrip[1], nil)
    local gcode, greason, gretry = answer_of(glimit, gentry, gtrip[4], gtrip[5])
    eg = {0, gcode, greason, gretry, glimit, gtrip[4], gtrip[2], gtrip[3]}
  elseif admitted == 1 and CALL.gw then
    eg = EG.taken
  end
  if dry then
    local eg_ = eg or EG.none
    local out = admit_reply(admitted, code, reason, retry, limit, tcount, tmax, bypass, 0,
                            shadow, tripped, cls, labels_of(members), did, emergency_out,
                            tkind, twin, md, CALL.dir, eg_[1], eg_[2], eg_[3], eg_[4],
                            eg_[5], eg_[6], eg_[7], eg_[8])
    for i = 1, #rows do
      local row = rows[i]
      for j = 1, #row do out[#out + 1] = row[j] end
    end
    return out
  end

  local fields_s = plan.fields_s
  -- its gateway full: the call holds none of the gateway's memberships
  local nogw = glimit and plan.gws
  if nogw then fields_s = plan.nogw_s end
  local decision = PLAIN_DECISION
  if admitted == 0 or tripped ~= 0 or shadow > 0 or emergency_out > 0 or tmax ~= -1
      or md ~= -1 then
    local eidx = 1
    if lentry then eidx = lentry.idx end
    decision = dec_pack(admitted, tripped, tcount, tmax, bypass, shadow, emergency_out,
                        KIND.codes[tkind] or 0, tretry, md, eidx, twin, limit)
  end

  local dkey = P_DIALOG .. did
  local deadline, old
  if admitted == 0 then
    -- remembered for the life of an INVITE transaction (64*T1); spends nothing
    old = redis.call('SET', dkey, rec_pack('rejected', NOW_S, '0', '0', '-1', '', node, '',
                                           fields_s, NOW_S, '0', cls, ATTRS_SIG, decision,
                                           tail), 'NX', 'GET', 'PX', DECIDED_S)
  else
    deadline = ns(now + early_ms)
    local ttl = LIVE_TTL_S
    if early_ms > EARLY_MS then ttl = ns(early_ms + DIALOG_MS + KEEP_MS) end
    local md_s = '-1'
    if md > 0 then md_s = ns(md) end
    old = redis.call('SET', dkey, rec_pack('early', deadline, '0', '0', md_s, '', node, '',
                                           fields_s, NOW_S, rq or '0', cls, ATTRS_SIG,
                                           decision, tail), 'NX', 'GET', 'PX', ttl)
  end
  if old then
    local r = existing(did, old, record, emergency, emergency_out, rq, now, cls, members)
    if r ~= false then return r end
    return decide(did, plan, flags, early_ms, node, now, lnow, cls, dry, rq, tail, attrs)
  end

  if admitted == 0 then
    if frej then
      redis.call('HINCRBY', DECISIONS, 'rejected;fraud|' .. limit, '1')
    else
      redis.call('HINCRBY', DECISIONS, 'rejected;rejected|' .. limit, '1')
    end
    if fw then FR.write(fw, now, true) end
    if attrs then attempt(did, 'j', cls, node, ns(code), limit, tkind, tail) end
  else
    -- the counts and spent states, one HSET (after the fraud states' fields, in their
    -- list: a table reused call after call, FR.W)
    local fields = plan.fields
    local w, wn = FR.W.fields, 0
    if fw then wn = fw.n end
    for i = 1, n do
      if not (nogw and nogw[i]) then
        w[wn + 1] = fields[i]
        w[wn + 2] = ns(counts[i] + 1)
        wn = wn + 2
        if spend and spend[i] then
          w[wn + 1] = members[i][5][4]
          w[wn + 2] = spend[i]
          wn = wn + 2
        end
      end
    end
    if fw and (fw.fresh or fw.events or fw.blocks) then FR.write(fw, now, false) end
    if wn > 0 then redis.call('HSET', COUNTS, unpack(w, 1, wn)) end
    -- the node's index of its dialogs (lease, expiry sweeps, the count of live dialogs)
    redis.call('ZADD', P_NODE .. node, deadline, did)
    if register then redis.call('SADD', NIDX, node) end
    local key
    if record then
      local r = {}
      for i = 1, n do r[i] = 'store_error|' .. members[i][1].name end
      key = 'recorded;' .. table.concat(r, ',')
    elseif plan.all and tripped == 0 and shadow == 0 and not nogw then
      key = plan.plain
    else
      local r = {}
      for i = 1, n do
        if not (nogw and nogw[i]) then
          local result = 'admitted'
          if i == tripped then result = 'bypassed'
          elseif i == shadow then result = 'shadow_rejected' end
          r[#r + 1] = result .. '|' .. members[i][1].name
        end
      end
      key = 'admitted;' .. table.concat(r, ',')
    end
    redis.call('HINCRBY', DECISIONS, key, '1')
    -- a full gateway, counted per tripped profile as the egress counts it
    if glimit then redis.call('HINCRBY', DECISIONS, 'egress;egress_full|' .. glimit, '1') end
    if attrs then
      local r = 'a'
      if record then r = 'f' end
      attempt(did, r, cls, node, '200', '', '', tail)
    end
  end
  local labels = members
  if nogw then
    labels = {}
    for i = 1, n do
      if not nogw[i] then labels[#labels + 1] = members[i] end
    end
  end
  return reply(admitted, code, reason, retry, limit, tcount, tmax, bypass, 0, shadow,
               tripped, cls, labels, did, emergency_out, tkind, twin, md, eg)
end
