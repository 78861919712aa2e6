-- ------------------------------------------------------------------ fraud
-- The fraud section's rules (FRAUD, compiled), evaluated in the admit: per rule and value
-- of its key, over a calendar window, the calls seen (admitted or rejected: sweeping
-- numbers is the fraud), the distinct numbers dialled (exact while the state lists them,
-- FR.SET_N or FR.SET_BYTES of them encoded; then a HyperLogLog seeded with the list: a
-- number is counted when PFADD says the sketch changed, up to 64; beyond, PFCOUNT's
-- estimate), the run of calls in a row to the same number, the key profile's live
-- calls, and the answered calls shorter than `under` (counted when they end). A
-- statistic that reaches a level (warning, critical) for the first time in the window
-- writes one event (P fraud, a capped stream; P fstats counts them); the call that
-- reaches critical is rejected with the rule's answer and the value is blocked (P c
-- 'B|rule:value' = until, listed in P fblocks), unless the rule is a shadow. A blocked
-- value's calls are rejected with the rule's answer until the block ends; then the
-- rule's critical levels are armed again for the rest of the window. Emergency calls
-- are never counted, refused or blocked.
-- State per rule and value (each field 'wid|...': its window's id; a field of an older
-- window reads as none), in P c:
--   'F|rule:value'  = 'wid|calls|distinct|run|block until|last number' (distinct, run
--                     and last only when the rule watches them; the end of the value's
--                     block by the rule, carried into later windows while it stands),
--                     read with the admit's counts: the block field is read only when
--                     the state names a block in force (a lift removes the field);
--   'Fn|rule:value' = the numbers dialled in the state's window, encoded: ',n1,n2,', or
--                     '*' once the window's sketch (P fh:F|rule:value:wid) holds them
--                     (no field: ',', or '*' when the state counts distinct numbers: an
--                     older layout's); read only when a call's number is not one its
--                     state entry knows to be listed and the state is not the one the
--                     entry wrote last;
--   'Fs|rule:value' = 'wid|short calls', read when an answered call ends;
--   'Fl|rule:value' = 'wid|levels|blocked until' (levels: a bit per statistic and level
--                     already reported), read only when a count is at a level of the rule;
-- listed in P fidx (by their 'F|' name) until the window ends (the tick forgets them;
-- a state that names a block in force stays until the block ends).
-- policer.store.fraud is the same rule in Python (the in-process store, replay).

-- (one table: the library's top level is at Lua's 200 locals)
local FR = {
  STATS = {'calls', 'distinct_numbers', 'sequential', 'concurrent', 'short_calls'},
  STATE = '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$',
  PAIR = '^([^|]*)|([^|]*)$',
  LEVELS = '^([^|]*)|([^|]*)|([^|]*)$',
  -- the critical bits of a state's levels, all statistics
  CRIT = 2 + 8 + 32 + 128 + 512,
  EVENTS = NS_PREFIX .. 'fraud',
  FSTATS = NS_PREFIX .. 'fstats',
  BLOCKS = NS_PREFIX .. 'fblocks',
  IDX = NS_PREFIX .. 'fidx',
  -- the distinct numbers a state lists before its sketch takes them: at most SET_N, of
  -- SET_BYTES encoded; past them, a state entry remembers up to SEEN_N of the numbers it
  -- added to the sketch
  SET_N = 32,
  SET_BYTES = 640,
  SEEN_N = 64,
  -- dialled numbers encoded (key_part), up to ENC_MAX of them (then forgotten at once):
  -- a number's encoding costs the admit as much as the rest of a rule's state
  ENC = {},
  ENC_N = 0,
  ENC_MAX = 10000,
  -- a state's distinct count as the fast way writes it ('|d|', FR.dp), made on first use
  DP = {},
  KEEP_S = '' .. FRAUD.keep,
  -- the longest `under` of the rules with short calls (0: none)
  UNDER = 0,
}
-- per rule: the rules sharing its state (group, on the rule keeping it, in order), the
-- bits of each statistic's levels in a state's `levels`, and the lowest level of each
-- statistic (huge: not watched): below them all, a call reads no levels
for i = 1, #FRAUD do
  local r = FRAUD[i]
  r.idx = i
  if r.st[5] and r.under > FR.UNDER then FR.UNDER = r.under end
  local owner = FRAUD.by[r.state]
  if owner.group == nil then owner.group = {} end
  owner.group[#owner.group + 1] = r
  r.bits, r.low = {}, {}
  for j = 1, 5 do
    r.bits[j] = 4 ^ (j - 1)
    local t, lo = r.st[j], 2 ^ 53
    if t then
      for k = 1, 2 do
        if t[k] > 0 and t[k] < lo then lo = t[k] end
      end
    end
    r.low[j] = lo
  end
end
-- per state kept (its group): the lowest level of its rules per counted statistic
-- (calls, distinct, run: below them all, a call reads no levels), whether any of its
-- rules watches concurrent calls (then every call looks at the rules' levels), and
-- whether it counts every call of its classes (no prefixes, no schedule)
for i = 1, #FRAUD do
  local r = FRAUD[i]
  local g = r.group
  if g then
    r.always = r.pre == nil and r.sched == nil
    r.glow, r.gconc = {2 ^ 53, 2 ^ 53, 2 ^ 53}, false
    for j = 1, #g do
      for k = 1, 3 do
        if g[j].low[k] < r.glow[k] then r.glow[k] = g[j].low[k] end
      end
      if g[j].st[4] and g[j].prof then r.gconc = true end
    end
  end
end
-- what one call writes (FR.check, FR.write; reused: fields n, then lists made when needed;
-- decide adds an admission's counts to the fields, or writes them there alone)
FR.W = {fields = {}, n = 0}

-- Does a rule apply to a call to `number` at lnow (its prefixes, its schedule)?
function FR.applies(r, number, lnow)
  if r.pre then
    local hit = false
    for i = 1, #r.pre do
      local p = r.pre[i]
      if string.sub(number, 1, #p) == p then
        hit = true
        break
      end
    end
    if not hit then return false end
  end
  if r.sched and not in_schedule(SCHED[r.sched], minute_of_week(lnow)) then return false end
  return true
end

-- A levels field ('Fl|') in the window `wid`: {levels, blocked until (ms, 0 none), the
-- two as the field held them (0 none), none of this window}. A block this rule set in
-- the window that has ended re-arms its critical levels: the next call that keeps a
-- statistic at critical crosses again.
function FR.levels(s, wid, now)
  if s then
    local w, lv, till = string.match(s, FR.LEVELS)
    if w == wid then
      lv, till = num(lv) or 0, tonumber(till) or 0
      if till > 0 and till <= now then
        local keep, rest, bit = 0, lv, 1
        for _ = 1, 10 do
          if rest % 2 == 1 and (FR.CRIT / bit) % 2 < 1 then keep = keep + bit end
          rest = math.floor(rest / 2)
          bit = bit * 2
        end
        return {keep, 0, lv, till, false}
      end
      return {lv, till, lv, till, false}
    end
  end
  return {0, 0, 0, 0, true}
end

-- A levels field (lv, FR.levels) that changed since it was read: its name and value put
-- into f after its n entries. Returns the new n, and whether it was put.
function FR.put_levels(f, n, name, wid, lv)
  if lv[1] == lv[3] and lv[2] == lv[4] then return n, false end
  f[n + 1], f[n + 2] = name, wid .. '|' .. ns(lv[1]) .. '|' .. ns(lv[2])
  return n + 2, true
end

-- A state field's value: its window (wp: the window's id and '|'), calls, distinct
-- numbers and run (the last two only when the state's rules watch them: r, any of
-- them), block until (0 none), the last number. (FR.check writes the same out in its
-- hot path; test_fraud_model holds the two to the model.)
function FR.pack(r, wp, c, d, q, till, last)
  local ds, qs, ts = '', '', ''
  if r.gd then ds = INT_S[d] or ns(d) end
  if r.gq then qs = INT_S[q] or ns(q) end
  if till > 0 then ts = ns(till) end
  return wp .. (INT_S[c] or ns(c)) .. '|' .. ds .. '|' .. qs .. '|' .. ts .. '|' .. last
end

-- A dialled number encoded (key_part), remembered when it is no longer than a phone
-- number could be: FR.ENC[number] or FR.enc(number).
function FR.enc(number)
  local e = key_part(number)
  if #number > 32 then return e end
  if FR.ENC_N >= FR.ENC_MAX then FR.ENC, FR.ENC_N = {}, 0 end
  FR.ENC[number], FR.ENC_N = e, FR.ENC_N + 1
  return e
end

-- The distinct count d as FR.check's fast way writes it in a state: FR.DP[d] or FR.dp(d).
function FR.dp(d)
  local s = '|' .. (INT_S[d] or ns(d)) .. '|'
  if d < 64 then FR.DP[d] = s end
  return s
end

-- fe.lroom of entry fe (FR.check) whose list is `set`, counting d: the list takes a
-- number shorter than it, when fe mirrors the list (fe.seen) and it has room for one more
-- number (FR.distinct's bounds); else -1.
function FR.lroom(fe, set, d)
  if fe.mirror and set and set ~= '*' and d < FR.SET_N then return FR.SET_BYTES - #set end
  return -1
end

-- The distinct numbers of the state of entry fe (FR.check) counting d, for a call to the
-- number enc (encoded) that fe does not know to be counted: set, the list as fe last knew
-- it (',n1,n2,', ',' none, '*' the window's sketch fe.hk holds them; nil unknown: read).
-- fe.seen, when fe.mirror: while the list is known, the numbers it holds; once the sketch
-- holds them, up to SEEN_N of the numbers added to it (fe.nseen of them). A list read
-- (another entry wrote the state) is searched, or made into fe.seen when `keep` (this
-- entry writes the state call after call). A number is listed while the list has room;
-- then it is added to the sketch (the list's numbers with it, the first time) and
-- counted when the sketch changed. Returns the new d and list, and whether the list
-- changed (to be written).
function FR.distinct(fe, enc, d, set, keep)
  if set == nil then
    set = redis.call('HGET', COUNTS, fe.nf)
    if not set then
      -- (none: an older layout's state counts its numbers in the sketch alone)
      if d > 0 then set = '*' else set = ',' end
    end
    if set == '*' then
      -- (what it knew of a list is not known to be in the sketch: a call not written)
      if fe[10] ~= '*' then fe.seen, fe.nseen = {}, 0 end
      fe.mirror = true
    end
  end
  if set == '*' then
    if fe.seen[enc] then return d, set, false end
    if redis.call('PFADD', fe.hk, enc) == 1 then
      if d < 64 then d = d + 1 else d = redis.call('PFCOUNT', fe.hk) end
    end
    if fe.nseen < FR.SEEN_N then fe.seen[enc], fe.nseen = true, fe.nseen + 1 end
    return d, set, false
  end
  if not fe.mirror then
    if keep then
      local seen = {}
      for e in string.gmatch(set, '[^,]+') do seen[e] = true end
      fe.seen, fe.mirror = seen, true
    elseif string.find(set, ',' .. enc .. ',', 1, true) then
      return d, set, false
    end
  end
  if fe.mirror then
    if fe.seen[enc] then return d, set, false end
    fe.seen[enc] = true
  end
  if d < FR.SET_N and #set + #enc < FR.SET_BYTES then return d + 1, set .. enc .. ',', true end
  -- (the list's numbers are in the sketch from here on)
  if fe.mirror then
    fe.nseen = d + 1
  else
    fe.seen, fe.nseen, fe.mirror = {[enc] = true}, 1, true
  end
  local all = {}
  for e in string.gmatch(set, '[^,]+') do all[#all + 1] = e end
  all[#all + 1] = enc
  redis.call('PFADD', fe.hk, unpack(all))
  redis.call('PEXPIREAT', fe.hk, ns(fe.we + 60000))
  return d + 1, '*', true
end

-- A state field's values: window, calls, distinct, run, last number, block until (nil
-- window: malformed).
function FR.parse(s)
  local sw, sc, sd, sq, st, sl = string.match(s, FR.STATE)
  return sw, num(sc) or 0, num(sd) or 0, num(sq) or 0, sl or '', tonumber(st) or 0
end

-- Statistic i of a rule at `count`: the levels it reaches for the first time in the
-- window are added to w.events ({rule, enc, stat, level, count, threshold}); lv[1] (the
-- levels, FR.levels) keeps them. Returns true when it reaches critical.
function FR.cross(r, enc, lv, i, count, w)
  local t = r.st[i]
  if not t or count < t[1] and (count < t[2] or t[2] < 0) then return false end
  local crit = false
  local bw = r.bits[i]
  for lvl = 1, 2 do
    local bit = bw * lvl
    local thr = t[lvl]
    if thr > 0 and count >= thr and math.floor(lv[1] / bit) % 2 == 0 then
      lv[1] = lv[1] + bit
      if w.events == nil then w.events = {} end
      w.events[#w.events + 1] = {r, enc, i, lvl, count, thr}
      if lvl == 2 then crit = true end
    end
  end
  return crit
end

-- The fraud rules over one call (its plan's fraud states, classify; what the admit's
-- HMGET read of them: h[plan.fpos[i]]), writing nothing but the distinct numbers'
-- sketches: returns the rule that rejects the call (a block in force, or critical
-- reached: the first such rule in the policy, whichever state it shares; nil none),
-- and the writes (nil none; FR.W): {fields (name, value, ...; n of them), events,
-- blocks {field, until}, new windows {field, end}} (each list nil when empty). dry:
-- only the blocks in force are read. A state entry (one shared by every plan whose
-- calls count in the state: FRAUD.shared, classify) keeps what it last wrote (s) and
-- its values (fe[4] window, [5] calls, [6] distinct, [7] run, [8] last number, [9] the
-- end of the blocks it names, [10] its numbers listed as in 'Fn|' (field fe.nf), nil
-- unknown), with its window's start and end (fe.ws, fe.we, UTC ms), id and part of the
-- field (fe.wid, fe.wp), sketch (fe.hk), the dialled number it last counted as it came
-- (fe.num: the one fe[8] encodes), and the numbers its list holds (fe.seen,
-- FR.distinct). A call in the window of the state the entry last wrote, the state
-- unchanged since, takes the short way: no window arithmetic, no list, sketch or
-- encoding for the number dialled last, no levels while its counts are below every
-- rule's lowest; and the fast way when it names no block either and its counts are
-- further below (while its calls are at most fe.lim).
function FR.check(plan, h, number, now, lnow, dry)
  local fraud, fpos = plan.fraud, plan.fpos
  local rej, w, f, wn = nil, nil, nil, 0
  local dialled = nil
  for i = 1, #fraud do
    local fe = fraud[i]
    -- the state as read: what this entry wrote last is not parsed again (nearly always:
    -- the same library writes it; any other writer's value differs and is parsed)
    local s, c = h[fpos[i]], fe[5] + 1
    if s == fe.s and c <= fe.lim and lnow < fe.we and lnow >= fe.ws and not dry then
      -- the fast way: the state this entry wrote, in its window, naming no block, its
      -- counts below the lowest level of its rules by more than the calls up to fe.lim
      -- (none reached: a statistic grows by one a call at most); only what changes is
      -- built again (fe.dpart: '|distinct|', fe.tail: '||last number' of a state that
      -- counts no runs)
      if w == nil then
        w = FR.W
        f, w.events, w.blocks, w.fresh = w.fields, nil, nil, nil
      end
      if number ~= fe.num and fe.nums then
        if dialled == nil then dialled = FR.ENC[number] or FR.enc(number) end
        if fe.gd and number ~= '' then
          if #dialled < fe.lroom then
            -- (FR.distinct's common case written out: a list this entry mirrors, with
            -- room for the number; fe.lroom: its bytes left, -1 when it has none)
            local seen = fe.seen
            if not seen[dialled] then
              seen[dialled] = true
              local d, set = fe[6] + 1, fe[10] .. dialled .. ','
              f[wn + 1], f[wn + 2] = fe.nf, set
              wn = wn + 2
              fe[6], fe[10], fe.dpart = d, set, FR.DP[d] or FR.dp(d)
              if d < FR.SET_N then fe.lroom = fe.lroom - #dialled - 1 else fe.lroom = -1 end
            end
          elseif not (fe.mirror and fe.seen[dialled]) then
            local d, set, changed = FR.distinct(fe, dialled, fe[6], fe[10], true)
            if changed then
              f[wn + 1], f[wn + 2] = fe.nf, set
              wn = wn + 2
            end
            fe[6], fe[10], fe.dpart = d, set, FR.DP[d] or FR.dp(d)
            fe.lroom = FR.lroom(fe, set, d)
            -- (from 64 on, the sketch's estimate: it may grow by more than one)
            if d >= 64 then fe.lim = 0 end
          end
        end
        if fe.gq then
          if dialled == fe[8] then fe[7] = fe[7] + 1 else fe[7], fe[8] = 1, dialled end
        end
        fe.num = number
      elseif fe.gq then
        fe[7] = fe[7] + 1
      end
      if fe.gq then
        s = fe.wp .. (INT_S[c] or ns(c)) .. fe.dpart .. (INT_S[fe[7]] or ns(fe[7])) .. '||'
            .. fe[8]
      else
        s = fe.wp .. (INT_S[c] or ns(c)) .. fe.dpart .. fe.tail
      end
      f[wn + 1], f[wn + 2] = fe[3], s
      wn = wn + 2
      fe.s, fe[5] = s, c
    else
      local r0 = fe[1]
      local same = s ~= nil and s == fe.s
      local vw, vc, vd, vq, vl, vt = nil, 0, 0, 0, '', 0
      if same then
        vt = fe[9]
      elseif s then
        vw, vc, vd, vq, vl, vt = FR.parse(s)
      end
      -- a block stops every call of its value: the state names the end of its rules'
      -- blocks, and a rule's block field, read only then, says whether it stands (lifted:
      -- gone)
      local ct, bs = 0, nil
      if vt > now then
        local rules = r0.group
        for j = 1, #rules do
          local r = rules[j]
          local b = tonumber(redis.call('HGET', COUNTS, 'B|' .. r.name .. ':' .. fe[2]))
          if b and b > now then
            if b > ct then ct = b end
            if not r.shadow and (rej == nil or r.idx < rej.idx) then rej = r end
            if bs == nil then bs = {} end
            bs[j] = b
          end
        end
      end
      if fe.counts and not dry and (r0.always or FR.applies(r0, number, lnow)) then
        if w == nil then
          w = FR.W
          f, w.events, w.blocks, w.fresh = w.fields, nil, nil, nil
        end
        local c, d, q, last, set, fresh
        local short = same and lnow < fe.we and lnow >= fe.ws
        if short then
          -- (the state this entry wrote, in its window; the number its last call counted
          -- is counted)
          c, d, q, last, set, fresh = fe[5] + 1, fe[6], fe[7], fe[8], fe[10], false
        else
          if same then vw, vc, vd, vq, vl = fe[4], fe[5], fe[6], fe[7], fe[8] end
          local win = window_at(r0.per, lnow)
          if vw == win[1] then
            c, d, q, last, fresh = vc + 1, vd, vq, vl, false
            if same then set = fe[10] end
          else
            c, d, q, last, set, fresh = 1, 0, 0, '', ',', true
          end
          -- (a state another entry wrote names another last number, and may list
          -- other numbers: set unknown)
          fe.num = nil
          if fe.we ~= win[2] then
            fe.ws, fe.we, fe.wid, fe.wp = win[4], win[2], win[1], win[1] .. '|'
            fe.hk = NS_PREFIX .. 'fh:' .. fe[3] .. ':' .. win[1]
            -- (what it knew of the list, and of the sketch, was of another window)
            fe[10] = nil
          end
          if fresh then
            fe.seen, fe.nseen, fe.mirror = {}, 0, true
          elseif not same then
            -- (the list as another entry left it: not known)
            fe.mirror = false
            if fe.seen == nil then fe.seen, fe.nseen = {}, 0 end
          end
        end
        local gd, gq = r0.gd, r0.gq
        if number ~= fe.num then
          -- (the number dialled last: counted, and the same encoded number)
          if dialled == nil and (gd or gq) then dialled = FR.ENC[number] or FR.enc(number) end
          if gd and number ~= '' and not (fe.mirror and fe.seen[dialled]) then
            local changed
            d, set, changed = FR.distinct(fe, dialled, d, set, short)
            if changed then
              f[wn + 1], f[wn + 2] = fe.nf, set
              wn = wn + 2
            end
          end
          if gq then
            if dialled == last then q = q + 1 else q = 1 end
            last = dialled
          end
          fe.num = number
        elseif gq then
          q = q + 1
        end
        local gl = r0.glow
        if c >= gl[1] or d >= gl[2] or q >= gl[3] or r0.gconc then
          local lrej
          wn, ct, lrej = FR.levels_of(plan, h, fe, c, d, q, ct, bs, now, w, wn)
          if lrej and (rej == nil or lrej.idx < rej.idx) then rej = lrej end
        end
        -- (FR.pack's format, written out: the call saves a tenth of the rules' cost on
        -- the admit, benchmarks.instructions --policy)
        local ds, qs, ts = '', '', ''
        if gd then ds = INT_S[d] or ns(d) end
        if gq then qs = INT_S[q] or ns(q) end
        if ct > 0 then ts = ns(ct) end
        s = fe.wp .. (INT_S[c] or ns(c)) .. '|' .. ds .. '|' .. qs .. '|' .. ts .. '|' .. last
        f[wn + 1], f[wn + 2] = fe[3], s
        wn = wn + 2
        -- (kept as read next: a call that is not written in the end, a retransmission,
        -- leaves the field as it was, which then differs from fe.s and is parsed)
        if short then
          fe.s, fe[5] = s, c
          if gd then fe[6], fe[10] = d, set end
          if gq then fe[7], fe[8] = q, last end
          if ct ~= vt then fe[9] = ct end
        else
          fe.s, fe[4], fe[5], fe[6], fe[7], fe[8], fe[9], fe[10] = s, fe.wid, c, d, q, last,
            ct, set
        end
        if fresh then
          if w.fresh == nil then w.fresh = {} end
          w.fresh[#w.fresh + 1] = {fe[3], fe.we}
        end
        -- the fast way for the next calls, up to the count of calls fe.lim: its counts stay
        -- below the lowest level of its rules until then (its rules watch no live calls,
        -- count every call of their classes; the state names no block)
        fe.lim = 0
        if ct == 0 and r0.always and not r0.gconc then
          local gl = r0.glow
          local room = gl[1] - c
          if gl[2] - d < room then room = gl[2] - d end
          if gl[3] - q < room then room = gl[3] - q end
          if d >= 64 then room = 0 end
          if room > 1 then
            fe.lim, fe.dpart = c + room - 1, '|' .. ds .. '|'
            -- (a state counting runs writes its last number in place, fe[8])
            if not gq then fe.tail = '||' .. last end
            if gd then fe.lroom = FR.lroom(fe, set, d) end
          end
        end
      end
    end
  end
  if w then w.n = wn end
  return rej, w
end

-- The levels of the rules sharing one state entry fe (FR.check) for a call whose counts
-- are c, d, q, at least one at the lowest level of some rule: each rule's levels field
-- read, crossings reported (w.events), a critical crossing of a rule that is no shadow
-- blocks its value (w.blocks; its field and the levels' written into w.fields after wn
-- entries). ct: the latest block end the state names, bs: the blocks in force per rule
-- of the group. Returns the new wn and ct, and the first rule that rejects (nil none).
function FR.levels_of(plan, h, fe, c, d, q, ct, bs, now, w, wn)
  local rules, enc, wid, f = fe[1].group, fe[2], fe.wid, w.fields
  local rej = nil
  for j = 1, #rules do
    local r = rules[j]
    local st, low = r.st, r.low
    local live, mi = 0, nil
    if st[4] and r.prof then
      -- the key profile's live calls with this one
      mi = FR.member(plan, r.prof)
      if mi then live = (num(h[plan.pos[mi]]) or 0) + 1 end
    end
    if c >= low[1] or d >= low[2] or q >= low[3] or live >= low[4] then
      -- a count at a level: the levels the rule reported in the window
      local fl = 'Fl|' .. r.name .. ':' .. enc
      local lv = FR.levels(redis.call('HGET', COUNTS, fl), wid, now)
      local crit = FR.cross(r, enc, lv, 1, c, w)
      if st[2] then crit = FR.cross(r, enc, lv, 2, d, w) or crit end
      if st[3] then crit = FR.cross(r, enc, lv, 3, q, w) or crit end
      if mi then crit = FR.cross(r, enc, lv, 4, live, w) or crit end
      if crit and not r.shadow then
        if rej == nil then rej = r end
        local t = now + r.block
        lv[2] = t
        local b = bs and bs[j]
        if not (b and b >= t) then
          if t > ct then ct = t end
          local bf = 'B|' .. r.name .. ':' .. enc
          f[wn + 1], f[wn + 2] = bf, ns(t)
          wn = wn + 2
          if w.blocks == nil then w.blocks = {} end
          w.blocks[#w.blocks + 1] = {bf, t}
        end
      end
      local put
      wn, put = FR.put_levels(f, wn, fl, wid, lv)
      if put and lv[5] and j > 1 then
        -- (a rule sharing another's state: its own fields listed for the tick)
        if w.fresh == nil then w.fresh = {} end
        w.fresh[#w.fresh + 1] = {'F|' .. r.name .. ':' .. enc, fe.we}
      end
    end
  end
  return wn, ct, rej
end

-- The position of a plan's member of profile `name` (nil none).
function FR.member(plan, name)
  local members = plan.members
  for j = 1, #members do
    if members[j][1].name == name then return j end
  end
  return nil
end

-- The writes of FR.check for a call decided: the states and blocks (w.fields, w.n of
-- them: an HSET of their own when hset, else the admission's HSET of its counts takes
-- the list and adds its own after them; it calls this only when one of the lists
-- below is there), their indexes, the events.
function FR.write(w, now, hset)
  if hset and w.n > 0 then redis.call('HSET', COUNTS, unpack(w.fields, 1, w.n)) end
  for i = 1, #(w.fresh or EMPTY) do
    redis.call('ZADD', FR.IDX, ns(w.fresh[i][2] + 60000), w.fresh[i][1])
  end
  for i = 1, #(w.blocks or EMPTY) do
    redis.call('ZADD', FR.BLOCKS, ns(w.blocks[i][2]), w.blocks[i][1])
  end
  if w.events then FR.emit(w.events, now) end
end

-- One event per level reached: the stream (capped) and the counters per rule, level
-- and statistic (the exporter's policer_fraud_events_total).
function FR.emit(events, now)
  for i = 1, #events do
    local e = events[i]
    local r, stat, level = e[1], FR.STATS[e[3]], 'warning'
    local action = 'report'
    if e[4] == 2 then
      level = 'critical'
      if r.shadow then action = 'shadow' else action = 'block' end
    end
    redis.call('XADD', FR.EVENTS, 'MAXLEN', '~', FR.KEEP_S, '*', 'rule', r.name, 'level',
               level, 'key', r.key, 'value', e[2], 'stat', stat, 'count', ns(e[5]),
               'threshold', ns(e[6]), 'window', r.per, 'action', action, 'at', ns(now),
               'block_ms', ns(r.block))
    redis.call('HINCRBY', FR.FSTATS, r.name .. '|' .. level .. '|' .. stat, '1')
  end
end

-- An answered call that ended after less than the longest `under`: counted in the
-- short calls of the rules it met (from its record: class, attributes), at the end.
function FR.short(raw, start_s, now)
  local dur = now - (tonumber(start_s) or now)
  if dur < 0 or dur >= FR.UNDER then return end
  local rec = rec_unpack(raw)
  if rec == nil or rec.sig ~= ATTRS_SIG or dec_unpack(rec.decision).emergency == '1' then
    return
  end
  local _, pos = field_at(rec.tail, 1)
  if not pos then return end
  local values = read_attrs(string.sub(rec.tail, pos))
  local number = values[NUMBER_ATTR] or ''
  local dir = ''
  if DIRECTIONS then dir = IP.direction(values[SOURCE_IP_ATTR] or '') end
  local frs = FRAUD.of[situation(rec.class, dir)] or FRAUD.of[situation('', '')] or EMPTY
  local w = {}
  for i = 1, #frs do
    local r = frs[i][1]
    local v = values[r.attr]
    if frs[i][2] and r.st[5] and dur < r.under and v and v ~= ''
        and FR.applies(r, number, now) then
      local enc = key_part(v)
      local f = r.name .. ':' .. enc
      local win = window_at(r.per, now)
      local wid = win[1]
      local n, fresh = 0, true
      local s = redis.call('HGET', COUNTS, 'Fs|' .. f)
      if s then
        local sw, sn = string.match(s, FR.PAIR)
        if sw == wid then n, fresh = num(sn) or 0, false end
      end
      n = n + 1
      local out = {'Fs|' .. f, wid .. '|' .. ns(n)}
      if n >= r.low[5] then
        local lv = FR.levels(redis.call('HGET', COUNTS, 'Fl|' .. f), wid, now)
        if FR.cross(r, enc, lv, 5, n, w) and not r.shadow then
          lv[2] = now + r.block
          out[3], out[4] = 'B|' .. f, ns(lv[2])
          redis.call('ZADD', FR.BLOCKS, out[4], out[3])
          -- the state (the one it shares) names the block: what the admit reads
          local sf = 'F|' .. r.state .. ':' .. enc
          local sw, sc, sd, sq, sl, st = FR.parse(redis.call('HGET', COUNTS, sf) or '')
          out[5], out[6] = sf, FR.pack(r, (sw or wid) .. '|', sc, sd, sq, math.max(st, lv[2]),
                                       sl)
        end
        FR.put_levels(out, #out, 'Fl|' .. f, wid, lv)
      end
      redis.call('HSET', COUNTS, unpack(out))
      if fresh then redis.call('ZADD', FR.IDX, ns(win[2] + 60000), 'F|' .. f) end
    end
  end
  if w.events then FR.emit(w.events, now) end
end

-- The tick's share: forget the states of windows that ended and the blocks that ended,
-- at most `batch` of each. Returns how many were forgotten.
function FR.sweep(now, batch)
  local limit = {'-inf', ns(now), 'LIMIT', '0', ns(batch)}
  -- a rule's fields of a value, listed by their 'F|' name; a state that names a block in
  -- force stays (listed again at the block's end)
  local old = redis.call('ZRANGEBYSCORE', FR.IDX, unpack(limit))
  if #old > 0 then
    local states = redis.call('HMGET', COUNTS, unpack(old))
    local fields, kept = {}, {}
    for i = 1, #old do
      local rest = string.sub(old[i], 3)
      local till = 0
      if states[i] then till = select(6, FR.parse(states[i])) end
      if till > now then
        kept[#kept + 1] = ns(till)
        kept[#kept + 1] = old[i]
      else
        fields[#fields + 1] = old[i]
      end
      fields[#fields + 1] = 'Fs|' .. rest
      fields[#fields + 1] = 'Fl|' .. rest
      fields[#fields + 1] = 'Fn|' .. rest
    end
    redis.call('HDEL', COUNTS, unpack(fields))
    redis.call('ZREM', FR.IDX, unpack(old))
    if #kept > 0 then redis.call('ZADD', FR.IDX, unpack(kept)) end
  end
  -- the blocks that ended; one set again since (a later crossing) is kept
  local ended = redis.call('ZRANGEBYSCORE', FR.BLOCKS, unpack(limit))
  if #ended > 0 then
    local till = redis.call('HMGET', COUNTS, unpack(ended))
    local gone = {}
    for i = 1, #ended do
      if not till[i] or (tonumber(till[i]) or 0) <= now then gone[#gone + 1] = ended[i] end
    end
    if #gone > 0 then redis.call('HDEL', COUNTS, unpack(gone)) end
    redis.call('ZREM', FR.BLOCKS, unpack(ended))
  end
  return #old + #ended
end
