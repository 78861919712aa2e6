-- ------------------------------------------------------------------ classification
-- The dialled number's class and the call's memberships, from its raw attributes.
-- policer.classify is the same rule in Python (the model).

-- Per profile, built once when the library loads: its count field (a no-value profile)
-- or its fields' prefix (a valued one: the encoded value follows), and the live limit,
-- live cap and rate/window state fields' prefixes.
for i = 1, #PLAN do
  local p = PLAN[i]
  p.idx = i
  if p.attr == 0 then p.fld = p.name else p.pre = p.name .. ':' end
  p.timed = false
  for j = 1, #p.entries do
    local e = p.entries[j]
    if e.T or e.win then p.timed = true end
  end
end

-- profiles by name (the answer of a repeated decision names its profile)
local PLAN_BY_NAME = {}
for i = 1, #PLAN do PLAN_BY_NAME[PLAN[i].name] = PLAN[i] end

-- the profiles a call of each class joins, in policy order ('' : no class), and the
-- decisions-hash field of such a call admitted plainly (every profile joined)
local PLAN_OF = {}
local PLAIN_KEY = {}
local function plan_for(cls)
  local ps, key = {}, 'admitted;'
  for i = 1, #PLAN do
    local p = PLAN[i]
    if p.when == nil or (cls ~= '' and p.when[cls]) then
      ps[#ps + 1] = p
      if #ps > 1 then key = key .. ',' end
      key = key .. 'admitted|' .. p.name
    end
  end
  PLAN_OF[cls] = ps
  PLAIN_KEY[cls] = key
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

-- The call's memberships in policy order: {profile plan, limit entry (nil: none
-- applies), encoded value ('' none), count field}; a call without a value for a valued
-- profile joins no count of it. at: the UTC ms schedules are evaluated at.
local function classify(values, at)
  local number = values[NUMBER_ATTR] or ''
  local cls = number_class(number) or ''
  local mow = 0
  if SCHEDULED then mow = minute_of_week(at) end
  local ps = PLAN_OF[cls] or PLAN_OF['']
  local members = {}
  local n = 0
  for i = 1, #ps do
    local p = ps[i]
    local e = p.entries[1]
    if p.sched then e = pick_entry(p, mow) end
    if p.attr == 0 then
      n = n + 1
      members[n] = {p, e, '', p.fld}
    else
      local v = values[p.attr]
      if v and v ~= '' then
        local enc = key_part(v)
        n = n + 1
        members[n] = {p, e, enc, p.pre .. enc}
      end
    end
  end
  return cls, number, members, n == #ps
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
