-- ------------------------------------------------------------------ encoding
-- SIP values into key parts, '<length>:<bytes>' fields, Redis's clock.

local EMPTY = {}

-- Redis's clock in ms, shifted by a test offset (0 in production); sets NOW_S (its
-- decimal string) and NOW_GRACE_S (GRACE_MS before it: a live record whose deadline is
-- not later has outlived its end).
local NOW_S = ''
local NOW_GRACE_S = ''
local function now_ms(offset)
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if offset and offset ~= '' and offset ~= '0' then ms = ms + (tonumber(offset) or 0) end
  NOW_S = string.format('%d', ms)
  NOW_GRACE_S = string.format('%d', ms - GRACE_MS)
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
-- always encoded, so no short value spells a long one's key). policer.store.keys.key_part
-- is the same function, for reading.
local function key_part(v)
  if #v > MAX_VALUE_BYTES then v = string.sub(v, 1, MAX_VALUE_BYTES) end
  -- (one anchored match of the whole value: a quarter cheaper than searching it for a
  -- character outside the class)
  if #v <= MAX_KEY_PART and string.find(v, '^[%w_%.@%-]*$') then return v end
  if PCT == nil then PCT = pct_table() end
  local e = string.gsub(v, '[^%w_%.@%-]', PCT)
  if #e <= MAX_KEY_PART then return e end
  return string.sub(e, 1, 64) .. '~' .. redis.sha1hex(v)
end

local function dialog_id(call_id, from_tag)
  return key_part(call_id) .. ';' .. key_part(from_tag)
end

-- A number from its decimal string, without strtod for the small integers a call's
-- counts and lengths are (a table of those seen, filled as they come); nil when s is no
-- number (or nil, false).
local INT_N = {}
local function num(s)
  local n = INT_N[s]
  if n then return n end
  n = tonumber(s)
  if n and n >= 0 and n < 4096 and n % 1 == 0 then INT_N[s] = n end
  return n
end

-- A value's live limits field ('L|<field>': '<max>' then its live caps' items, ',...'),
-- decoded once: {live max (false: none), the caps' items (false: none)}; nil when s is
-- nil (no live limits).
local function live_of(s)
  if not s then return nil end
  local mx, caps = string.match(s, '^(%-?%d*)(.*)$')
  return {mx ~= '' and tonumber(mx) or false, caps ~= '' and caps or false}
end

-- '<len>:<bytes>' fields from position pos of s (a length of 1 to 9 digits, as
-- policer.call.unpack_fields reads them): returns the field and the next position
-- (nil when s ends or is malformed).
local function field_at(s, pos)
  local len_s, start = string.match(s, '^(%d%d?%d?%d?%d?%d?%d?%d?%d?):()', pos)
  if not len_s then return nil, nil end
  local stop = start + num(len_s) - 1
  if stop > #s then return nil, nil end
  return string.sub(s, start, stop), stop + 1
end

-- a text value safe to keep and show: cut to MAX_VALUE_BYTES
local function bounded(v)
  if #v > MAX_VALUE_BYTES then return string.sub(v, 1, MAX_VALUE_BYTES) end
  return v
end

-- An instant in Redis's clock (ms) from a caller's clock: its time s (seconds, a
-- fraction allowed, as the caller's clock reads) plus add ms (the caller's measured
-- offset to Redis's clock, and its budget); nil when either is missing or malformed.
local function redis_ms(s, add)
  local a, b = tonumber(s), tonumber(add)
  if a == nil or b == nil then return nil end
  return math.floor(a * 1000 + b)
end
