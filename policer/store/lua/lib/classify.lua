-- ------------------------------------------------------------------ classification
-- The dialled number's class and the call's memberships, from its raw attributes.
-- policer.classify is the same rule in Python (the model).

-- Per profile, built once when the library loads: its count field (a no-value profile)
-- or its fields' prefix (a valued one: the encoded value follows), and the live limit,
-- live cap and rate/window state fields' prefixes.
for i = 1, #PLAN do
  local p = PLAN[i]
  p.idx = i
  if p.attr == 0 then
    p.fld = p.name
    p.fields = {'', p.fld, 'L|' .. p.fld, 'R|' .. p.fld, 'T|' .. p.fld}
  else
    p.pre = p.name .. ':'
    p.vcache = {}
  end
  p.timed = false
  for j = 1, #p.entries do
    local e = p.entries[j]
    if e.T or e.win then p.timed = true end
  end
end

-- profiles by name (the answer of a repeated decision names its profile)
local PLAN_BY_NAME = {}
for i = 1, #PLAN do PLAN_BY_NAME[PLAN[i].name] = PLAN[i] end

-- the profiles a call of each class joins, in policy order ('' : no class), the
-- decisions-hash field of such a call admitted plainly (every profile joined), and the
-- attributes their values come from (the key of a call's plan in PLANS)
local PLAN_OF = {}
local PLAIN_KEY = {}
local KEY_ATTRS = {}
local function plan_for(cls)
  local ps, key, ka = {}, 'admitted;', {}
  for i = 1, #PLAN do
    local p = PLAN[i]
    if p.when == nil or (cls ~= '' and p.when[cls]) then
      ps[#ps + 1] = p
      if #ps > 1 then key = key .. ',' end
      key = key .. 'admitted|' .. p.name
      if p.attr ~= 0 then ka[#ka + 1] = p.attr end
    end
  end
  PLAN_OF[cls] = ps
  PLAIN_KEY[cls] = key
  KEY_ATTRS[cls] = ka
end
plan_for('')
for i = 1, #CLASSES do plan_for(CLASSES[i]) end

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

-- A valued profile's fields for one raw value: {encoded value, count field, live max
-- field, live caps field, state field}, remembered per profile (VCACHE_MAX values in
-- all, then forgotten at once): a value that calls again costs a table lookup.
local VCACHE_N = 0
local VCACHE_MAX = 20000

local function value_fields(p, v)
  local c = p.vcache[v]
  if c then return c end
  if VCACHE_N >= VCACHE_MAX then
    for i = 1, #PLAN do if PLAN[i].vcache then PLAN[i].vcache = {} end end
    VCACHE_N = 0
  end
  local enc = key_part(v)
  local fld = p.pre .. enc
  c = {enc, fld, 'L|' .. fld, 'R|' .. fld, 'T|' .. fld}
  p.vcache[v] = c
  VCACHE_N = VCACHE_N + 1
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
-- first, then per member its count field; a valued member also its live max, live caps
-- and state; a no-value member with a rate or windows its state), pos[i] member i's
-- count in that reply, fields the count fields (fields_s ','-joined), all: every
-- profile of its class joined, md its max duration.
local function plan_entry(members, all, cls)
  local hm, pos, fields = {'!hold'}, {}, {}
  local n = 1
  for i = 1, #members do
    local m = members[i]
    local c = m[5]
    n = n + 1
    hm[n] = c[2]
    pos[i] = n
    fields[i] = c[2]
    if m[3] ~= '' then
      hm[n + 1] = c[3]
      hm[n + 2] = c[4]
      hm[n + 3] = c[5]
      n = n + 3
    elseif m[1].timed then
      n = n + 1
      hm[n] = c[5]
    end
  end
  return {members = members, all = all, hm = hm, pos = pos, fields = fields,
          fields_s = table.concat(fields, ','), md = max_duration(members, cls)}
end

-- The call's memberships in policy order; a call without a value for a valued profile
-- joins no count of it. mow: the minute of the week schedules pick entries at.
local function build_plan(values, cls, mow)
  local ps = PLAN_OF[cls] or PLAN_OF['']
  local members = {}
  local n = 0
  for i = 1, #ps do
    local p = ps[i]
    local e = p.entries[1]
    if p.sched then e = pick_entry(p, mow) end
    if p.attr == 0 then
      n = n + 1
      members[n] = {p, e, '', p.fld, p.fields}
    else
      local v = values[p.attr]
      if v and v ~= '' then
        local c = value_fields(p, v)
        n = n + 1
        members[n] = {p, e, c[1], c[2], c}
      end
    end
  end
  return plan_entry(members, n == #ps, cls)
end

-- Plans by class, then by the values of its KEY_ATTRS (nested tables; false: no value),
-- PLANS_MAX in all, then forgotten at once: a call like an earlier one (the same class,
-- user, account...) costs a few table lookups. A policy with schedules picks entries by
-- the minute: its plans are built per call.
local PLANS = {}
local PLANS_N = 0
local PLANS_MAX = 20000

-- The dialled number's class, the number, and the call's plan (at: the UTC ms schedules
-- are evaluated at).
local function classify(values, at)
  local number = values[NUMBER_ATTR] or ''
  local cls = number_class(number) or ''
  if SCHEDULED then return cls, number, build_plan(values, cls, minute_of_week(at)) end
  local ka = KEY_ATTRS[cls] or KEY_ATTRS['']
  local t = PLANS[cls]
  if t == nil then
    t = {}
    PLANS[cls] = t
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
  if plan == nil then
    if PLANS_N >= PLANS_MAX then
      PLANS = {}
      PLANS_N = 0
    end
    plan = build_plan(values, cls, 0)
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
