-- ------------------------------------------------------------------ local time
-- The policy's time zone (compiled into UTC offset transitions), schedules, calendar
-- windows. policer.calendar is the same arithmetic in Python.

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

local function in_schedule(iv, mow)
  for j = 1, #iv, 2 do
    if mow >= iv[j] and mow < iv[j + 1] then return true end
  end
  return false
end

-- The entry of a profile's limit that applies at local minute of week mow: the first
-- whose schedule matches (nil: none does, the profile is only counted then).
local function pick_entry(p, mow, es)
  es = es or p.entries
  if not p.sched then return es[1] end
  for j = 1, #es do
    local e = es[j]
    if e.sched == nil or in_schedule(SCHED[e.sched], mow) then return e end
  end
  return nil
end
