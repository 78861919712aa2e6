-- ------------------------------------------------------------------ classification
-- The dialled number's class and the call's memberships, from its raw attributes.
-- policer.classify is the same rule in Python (the model).

-- Per profile, built once when the library loads: its count field (a no-value profile)
-- or its fields' prefix (a valued one: the encoded value follows), and the live limits
-- and rate/window state fields' prefixes.
for i = 1, #PLAN do
  local p = PLAN[i]
  p.idx = i
  if p.attr == 0 then
    p.fld = p.name
    p.fields = {'', p.fld, 'L|' .. p.fld, 'T|' .. p.fld}
  else
    p.pre = p.name .. ':'
    p.vcache = {}
  end
end

-- A profile's limit entry by its number: the profile's entries, then its values' own
-- (a decision given again names the entry that tripped by it).
local function entry_by_idx(p, idx)
  if idx <= #p.entries then return p.entries[idx] end
  for _, es in pairs(p.values or EMPTY) do
    for j = 1, #es do
      if es[j].idx == idx then return es[j] end
    end
  end
  return nil
end

-- profiles by name (the answer of a repeated decision names its profile)
local PLAN_BY_NAME = {}
for i = 1, #PLAN do PLAN_BY_NAME[PLAN[i].name] = PLAN[i] end

-- A call's situation: its class and, when the policy has directions, its direction
-- ('' none of either); what decides which profiles it joins.
local function situation(cls, dir)
  if DIRECTIONS then return cls .. '|' .. dir end
  return cls
end

-- the profiles a call of each situation joins, in policy order, the decisions-hash
-- field of such a call admitted plainly (every profile joined), and the attributes their
-- values come from (the key of a call's plan in PLANS)
local PLAN_OF = {}
local PLAIN_KEY = {}
local KEY_ATTRS = {}
-- the fraud rules by name (FRAUD.by), and per situation every rule with whether a call
-- of it may count (FRAUD.of: {rule, by its class}; prefixes and schedules are per call;
-- a block stops every call of its value): their keys' attributes are part of a plan's
-- key too
FRAUD.by, FRAUD.of = {}, {}
for i = 1, #FRAUD do FRAUD.by[FRAUD[i].name] = FRAUD[i] end
-- the fraud state entries the plans share, by state field (fraud.lua's FR.check keeps
-- what it last wrote in an entry): every plan whose calls count in a state (an
-- account's users, a user's calls of every class a rule counts) holds the same entry, so
-- that what one plan wrote is what the next one reads; SHARED_MAX of them, then
-- forgotten at once (a plan keeps its own until it is built again)
FRAUD.shared, FRAUD.nshared, FRAUD.SHARED_MAX = {}, 0, 10000
local function plan_for(cls, dir)
  local ps, key, ka = {}, 'admitted;', {}
  local seen = {}
  for i = 1, #PLAN do
    local p = PLAN[i]
    if (p.when == nil or (cls ~= '' and p.when[cls]))
        and (p.dirs == nil or (dir ~= '' and p.dirs[dir])) then
      ps[#ps + 1] = p
      if #ps > 1 then key = key .. ',' end
      key = key .. 'admitted|' .. p.name
      if p.attr ~= 0 and not seen[p.attr] then
        ka[#ka + 1] = p.attr
        seen[p.attr] = true
      end
    end
  end
  local fr = {}
  for i = 1, #FRAUD do
    local r = FRAUD[i]
    fr[i] = {r, r.when == nil or (cls ~= '' and r.when[cls] == true)}
    if not seen[r.attr] then
      ka[#ka + 1] = r.attr
      seen[r.attr] = true
    end
  end
  local sk = situation(cls, dir)
  PLAN_OF[sk] = ps
  PLAIN_KEY[sk] = key
  KEY_ATTRS[sk] = ka
  FRAUD.of[sk] = fr
end
for d = 0, #DIRS.names do
  local dir = DIRS.names[d] or ''
  plan_for('', dir)
  for i = 1, #CLASSES do plan_for(CLASSES[i], dir) end
end

-- ------------------------------------------------------------------ direction
-- A source IP as 16-bit groups (IPv4: 2, IPv6: 8; an IPv4-mapped IPv6 address is its
-- IPv4 address) and its family (4, 6); nil when it is no address. policer.classify's
-- parse_ip is the same rule in Python (what ipaddress.ip_address reads).

local IP = {}  -- (a table of functions: the library's top level may have 200 locals)

function IP.v4_groups(s, out)
  local a, b, c, d = string.match(s, '^(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)$')
  if a == nil then return false end
  local o = {a, b, c, d}
  for i = 1, 4 do
    local x = o[i]
    if #x > 1 and string.sub(x, 1, 1) == '0' then return false end
    x = tonumber(x)
    if x > 255 then return false end
    o[i] = x
  end
  out[#out + 1] = o[1] * 256 + o[2]
  out[#out + 1] = o[3] * 256 + o[4]
  return true
end

-- hex groups 'a:b:c' ('' none) appended to out; false when one is not 1-4 hex digits
function IP.hex_groups(s, out)
  if s == '' then return true end
  for g in string.gmatch(s .. ':', '([^:]*):') do
    if #g < 1 or #g > 4 or string.find(g, '[^%x]') then return false end
    out[#out + 1] = tonumber(g, 16)
  end
  return true
end

function IP.parse(s)
  if #s > 64 then return nil end
  if string.sub(s, 1, 1) == '[' and string.sub(s, -1) == ']' then s = string.sub(s, 2, -2) end
  if not string.find(s, ':', 1, true) then
    local g = {}
    if IP.v4_groups(s, g) then return 4, g end
    return nil
  end
  local zone = string.find(s, '%', 1, true)
  if zone then s = string.sub(s, 1, zone - 1) end
  local tail = {}
  local head, v4 = string.match(s, '^(.*:)(%d+%.%d+%.%d+%.%d+)$')
  if head then
    if not IP.v4_groups(v4, tail) then return nil end
    if string.sub(head, -2) ~= '::' then head = string.sub(head, 1, -2) end
    s = head
  end
  local left, right = {}, {}
  local gap = string.find(s, '::', 1, true)
  if gap then
    if string.find(s, '::', gap + 1, true) then return nil end
    if not IP.hex_groups(string.sub(s, 1, gap - 1), left) then return nil end
    if not IP.hex_groups(string.sub(s, gap + 2), right) then return nil end
  elseif not IP.hex_groups(s, left) then
    return nil
  end
  for i = 1, #tail do right[#right + 1] = tail[i] end
  local n = #left + #right
  if (gap and n > 7) or (not gap and n ~= 8) then return nil end
  local g = left
  for _ = 1, 8 - n do g[#g + 1] = 0 end
  for i = 1, #right do g[#g + 1] = right[i] end
  if g[1] == 0 and g[2] == 0 and g[3] == 0 and g[4] == 0 and g[5] == 0 and g[6] == 65535 then
    return 4, {g[7], g[8]}
  end
  return 6, g
end

-- DIRS.nets: {direction, family, whole groups, divisor of the partial group (0 none),
-- the groups...}, in the order listed
function IP.in_net(fam, g, net)
  if fam ~= net[2] then return false end
  local full = net[3]
  for i = 1, full do
    if g[i] ~= net[4 + i] then return false end
  end
  local div = net[4]
  if div > 0 then return math.floor(g[full + 1] / div) == net[5 + full] end
  return true
end

-- directions by source IP, remembered (IP.MAX in all, then forgotten at once)
IP.cache, IP.n, IP.MAX = {}, 0, 20000

-- the direction of a source IP ('' none)
function IP.direction(ip)
  local d = IP.cache[ip]
  if d then return d end
  d = DIRS.default or ''
  local fam, g = IP.parse(ip)
  if fam then
    local nets = DIRS.nets
    for i = 1, #nets do
      if IP.in_net(fam, g, nets[i]) then
        d = nets[i][1]
        break
      end
    end
  end
  if IP.n >= IP.MAX then
    IP.cache, IP.n = {}, 0
  end
  IP.cache[ip] = d
  IP.n = IP.n + 1
  return d
end

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

-- The attributes as the caller packed them, in ATTRS order.
local function read_attrs(attrs)
  local values = {}
  local pos = 1
  for i = 1, NATTRS do
    local v, nxt = field_at(attrs, pos)
    if v == nil then break end
    values[i] = v
    pos = nxt
  end
  return values
end

-- A valued profile's fields for one raw value: {encoded value, count field, live limits
-- field (its live max and live caps), state field}, remembered per profile (VCACHE.MAX
-- values in all, then forgotten at once): a value that calls again costs a table lookup.
local VCACHE = {n = 0, MAX = 20000}

local function value_fields(p, v)
  local c = p.vcache[v]
  if c then return c end
  if VCACHE.n >= VCACHE.MAX then
    for i = 1, #PLAN do if PLAN[i].vcache then PLAN[i].vcache = {} end end
    VCACHE.n = 0
  end
  local enc = key_part(v)
  local fld = p.pre .. enc
  c = {enc, fld, 'L|' .. fld, 'T|' .. fld}
  p.vcache[v] = c
  VCACHE.n = VCACHE.n + 1
  return c
end

-- The call's max duration (ms, -1 none): the smallest of its limits' and its class's.
local function max_duration(members, cls)
  local md = MD_DEFAULT
  if cls ~= '' and MD_CLASS[cls] then md = MD_CLASS[cls] end
  for i = 1, #members do
    local e = members[i][2]
    if e and e.dur > 0 and (md < 0 or e.dur < md) then md = e.dur end
  end
  return md
end

-- A call's plan: its memberships ({profile plan, limit entry (nil: none applies),
-- encoded value ('' none), count field, its fields (value_fields)}) and what deciding
-- over them reads and writes, built once: hm the fields of P c one HMGET reads ('!hold'
-- first, then per member its count field; a valued member also its live limits (its
-- live max and live caps, one field) at lpos[i], unless the plan keeps them (lvals:
-- member -> its live limits as read when it was built, decoded (live_of), false none,
-- at the live version ver, which the HMGET reads again at vpos); a member whose limit
-- has a rate or windows its state: spos[i] its position, false none, and decide reads
-- a value's state with live caps only then), pos[i] member i's count in that reply,
-- fields the count fields (fields_s ','-joined), all: every profile of its class
-- joined, md its max duration.
local function plan_entry(members, all, cls, dir, looked, missing, fraud, lvals)
  local hm, pos, fields, spos, lpos = {'!hold'}, {}, {}, {}, nil
  local n = 1
  for i = 1, #members do
    local m = members[i]
    local c = m[5]
    n = n + 1
    hm[n] = c[2]
    pos[i] = n
    fields[i] = c[2]
    spos[i] = false
    if m[3] ~= '' and not lvals then
      n = n + 1
      hm[n] = c[3]
      if lpos == nil then lpos = {} end
      lpos[i] = n
    end
    local e = m[2]
    if e and (e.T or e.win) then
      n = n + 1
      hm[n] = c[4]
      spos[i] = n
    end
  end
  -- the fraud states (classify): their fields read with the counts (positions fpos; a
  -- state names the end of its rules' blocks, whose fields are read only then)
  local fpos = nil
  if fraud then
    fpos = {}
    for i = 1, #fraud do
      n = n + 1
      hm[n] = fraud[i][3]
      fpos[i] = n
    end
  end
  -- a plan built on live parents or keeping live limits: the live version then (P c
  -- '^', a new token on every change of a live parent or live limit; false none), read
  -- again with the counts at vpos; another makes the plan stale (one field for the whole
  -- hierarchy and all the members' live limits)
  local vpos = nil
  if looked and looked.ver ~= nil then
    n = n + 1
    hm[n] = '^'
    vpos = n
  end
  -- the members whose value is where the call is sent (member -> true, nil none), and
  -- the count fields without them (a call admitted while its gateway is full)
  local gws, nogw = nil, nil
  for i = 1, #members do
    if members[i][1].gw then
      if gws == nil then gws = {} end
      gws[i] = true
    end
  end
  if missing and missing.gw and gws == nil then gws = {} end
  if gws then
    nogw = {}
    for i = 1, #members do
      if not gws[i] then nogw[#nogw + 1] = fields[i] end
    end
  end
  return {members = members, all = all, hm = hm, pos = pos, spos = spos, fields = fields,
          fields_s = table.concat(fields, ','), md = max_duration(members, cls),
          dir = dir or '', plain = PLAIN_KEY[situation(cls, dir or '')], vpos = vpos,
          ver = looked and looked.ver, lpos = lpos, lvals = lvals,
          missing = missing, gws = gws, nogw_s = nogw and table.concat(nogw, ',') or '',
          fraud = fraud, fpos = fpos}
end

-- The live parents read (t: by field, false none) at the live version ver: a plan
-- built later at the same version reads each parent once (an upper level's few values,
-- a reseller's group, are shared by many customers); another version, or MAX entries,
-- and they are forgotten at once.
local PCACHE = {ver = nil, n = 0, t = {}, MAX = 20000}

-- A profile's value for a call (false: none): its attribute's, or for a level of a
-- hierarchy the parent registered for the value of the profile it is the parent of (the
-- live one in P parents, else the file's). pv: the values found so far, by profile;
-- looked: ver, the live version read before the first live parent.
local function value_of(p, values, pv, looked)
  local v = pv[p.name]
  if v ~= nil then return v end
  if p.of == nil then
    v = values[p.attr] or false
    if v == '' then v = false end
  else
    v = false
    local child = value_of(PLAN_BY_NAME[p.of], values, pv, looked)
    if child then
      if looked.ver == nil then
        looked.ver = redis.call('HGET', COUNTS, '^')
        if PCACHE.ver ~= looked.ver or PCACHE.n >= PCACHE.MAX then
          PCACHE.ver, PCACHE.n, PCACHE.t = looked.ver, 0, {}
        end
      end
      local f = p.name .. ':' .. key_part(child)
      local live = PCACHE.t[f]
      if live == nil then
        live = redis.call('HGET', PARENTS, f)
        PCACHE.t[f] = live
        PCACHE.n = PCACHE.n + 1
      end
      if live and live ~= '' then v = live
      elseif p.fpar then v = p.fpar[child] or false end
    end
  end
  pv[p.name] = v
  return v
end

-- The call's memberships in policy order; a call without a value for a valued profile
-- joins no count of it. mow: the minute of the week schedules pick entries at; gw: only
-- the profiles whose value is where the call is sent (an egress attempt's); kept: the
-- plan is kept for later calls (classify), so it keeps its members' live limits, read
-- now with the live version (a plan built for one call reads them with its counts).
local function build_plan(values, cls, dir, mow, gw, kept)
  local ps = PLAN_OF[situation(cls, dir)] or PLAN_OF[situation('', '')]
  local members = {}
  local n = 0
  local pv, looked, missing = nil, nil, nil
  for i = 1, #ps do
    local p = ps[i]
    local e = p.entries[1]
    if p.sched then e = pick_entry(p, mow) end
    if gw and not p.gw then
    elseif p.attr == 0 then
      n = n + 1
      members[n] = {p, e, '', p.fld, p.fields}
    else
      local v = values[p.attr]
      if p.of then
        if pv == nil then pv, looked = {}, {} end
        v = value_of(p, values, pv, looked)
        -- a value whose parent is unknown, at a level that rejects such calls
        if not v and p.miss and pv[p.of] and missing == nil then missing = p end
      end
      if v and v ~= '' then
        if p.values then
          -- a value with limits of its own (limits.PROFILE.values): they stand instead
          local own = p.values[v]
          if own then e = pick_entry(p, mow, own) end
        end
        local c = value_fields(p, v)
        n = n + 1
        members[n] = {p, e, c[1], c[2], c}
      end
    end
  end
  local lvals = nil
  if kept then
    local lf, li = nil, nil
    for i = 1, n do
      if members[i][3] ~= '' then
        if lf == nil then lf, li = {}, {} end
        lf[#lf + 1] = members[i][5][3]
        li[#li + 1] = i
      end
    end
    if lf then
      if looked == nil then looked = {} end
      local first = 1
      if looked.ver == nil then
        table.insert(lf, 1, '^')
        first = 2
      end
      local got = redis.call('HMGET', COUNTS, unpack(lf))
      if first == 2 then looked.ver = got[1] end
      lvals = {}
      for j = 1, #li do lvals[li[j]] = live_of(got[j + first - 1]) or false end
    end
  end
  -- the fraud states of the rules with a value of their key in the call: {the rule
  -- keeping the state (its group, FR.GROUP, shares it: model.shared_counts), encoded
  -- value, state field, counts = whether the call's class counts}; fraud.lua keeps what
  -- it last wrote in it. An entry whose calls count is shared (FRAUD.shared); one whose
  -- calls do not (another class of the same user) only reads the state: its own.
  local fraud = nil
  local frs = FRAUD.of[situation(cls, dir)] or FRAUD.of[situation('', '')] or EMPTY
  for i = 1, #frs do
    local r = frs[i][1]
    local v = values[r.attr]
    if r.state == r.name and v and v ~= '' and not gw then
      if fraud == nil then fraud = {} end
      local enc = key_part(v)
      local field, counts = 'F|' .. r.name .. ':' .. enc, frs[i][2]
      local fe = counts and FRAUD.shared[field]
      if not fe then
        local nf = nil
        if r.gd then nf = 'Fn|' .. r.name .. ':' .. enc end
        -- (the state's statistics of numbers, copied for fraud.lua's fast way: gd
        -- distinct numbers, gq runs, nums either)
        fe = {r, enc, field, [5] = 0, counts = counts, lim = 0, nf = nf, gd = r.gd,
              gq = r.gq, nums = r.gd or r.gq}
        if counts then
          if FRAUD.nshared >= FRAUD.SHARED_MAX then FRAUD.shared, FRAUD.nshared = {}, 0 end
          FRAUD.shared[field], FRAUD.nshared = fe, FRAUD.nshared + 1
        end
      end
      fraud[#fraud + 1] = fe
    end
  end
  return plan_entry(members, n == #ps, cls, dir, looked, missing, fraud, lvals)
end

-- Plans by situation, then by the values of its KEY_ATTRS (nested tables; false: no value),
-- PLANS_MAX in all, then forgotten at once: a call like an earlier one (the same class,
-- user, account...) costs a few table lookups. A policy with schedules picks entries by
-- the minute: its plans are built per call.
local PLANS = {}
local PLANS_N = 0
local PLANS_MAX = 20000

-- The dialled number's class, the number, and the call's plan (at: the UTC ms schedules
-- are evaluated at).
local function classify(values, at, fresh)
  local number = values[NUMBER_ATTR] or ''
  local cls = number_class(number) or ''
  local dir = ''
  if DIRECTIONS then dir = IP.direction(values[SOURCE_IP_ATTR] or '') end
  if SCHEDULED then return cls, number, build_plan(values, cls, dir, minute_of_week(at)) end
  local sk = situation(cls, dir)
  local ka = KEY_ATTRS[sk] or KEY_ATTRS[situation('', '')]
  local t = PLANS[sk]
  if t == nil then
    t = {}
    PLANS[sk] = t
  end
  local last = #ka
  for i = 1, last - 1 do
    local v = values[ka[i]] or false
    local u = t[v]
    if u == nil then
      u = {}
      t[v] = u
    end
    t = u
  end
  local leaf = true
  if last > 0 then leaf = values[ka[last]] or false end
  local plan = t[leaf]
  if plan == nil or fresh then
    if PLANS_N >= PLANS_MAX then
      PLANS = {}
      PLANS_N = 0
    end
    plan = build_plan(values, cls, dir, 0, nil, true)
    t[leaf] = plan
    PLANS_N = PLANS_N + 1
  end
  return cls, number, plan
end

-- a membership's label as shown: profile or profile=encoded value
local function labels_of(members)
  local out = {}
  for i = 1, #members do
    local m = members[i]
    if m[3] == '' then out[i] = m[1].name else out[i] = m[1].name .. '=' .. m[3] end
  end
  return table.concat(out, '\n')
end

-- the labels of a record's count fields (profile or profile:value -> profile[=value])
local function labels_of_fields(fields)
  return (string.gsub(string.gsub(fields, ',', '\n'), ':', '='))
end

-- The answer of a rejection by a profile's limit: {code, reason, retry_after}
local function reject_of(profile)
  local r = REJECT_BY_PROFILE[profile]
  if r then return r end
  return DEFAULT_REJECT
end
