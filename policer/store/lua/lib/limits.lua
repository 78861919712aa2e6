-- ------------------------------------------------------------------ limits
-- Rates (GCRA) and calendar windows of one member, from its state string in P c
-- ('T|<field>': '<TAT us>' then '|<per>=<window id>:<count>' per window) and its live
-- caps (the items after its live max in 'L|<field>': ',R=<max>:<per ms>:<burst>',
-- ',<per>=<max>').

local function ceil_s(ms)
  local s = math.ceil(ms / 1000)
  if s < 1 then return 1 end
  return s
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

-- A rate's part of a member's check (T nil: no rate): the trip (kind, count, max, retry;
-- nil kind: it passes), the arrival time this call moves it to (ts when no rate), the
-- calls owed and the burst (-1, -1: no rate).
local function rate_trip(T, tau, burst, ts, now)
  if not T then return nil, 0, -1, -1, ts, -1, -1 end
  local owed, retry, new = check_rate(T, tau, ts, now)
  if retry ~= -1 then return 'rate', owed, burst, retry, new, owed, burst end
  return nil, 0, -1, -1, new, owed, burst
end

-- A calendar window's trip: its count n reached its max (the window ends at ends).
local function calls_trip(n, wmax, per, ends, lnow)
  return 'calls', n, wmax, per, ceil_s(ends - lnow)
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
  local kind, count, max, retry, new, owed, burst = rate_trip(e.T, e.tau, e.burst, ts, now)
  local window = ''
  if not win then return kind, count, max, retry, window, new, owed, burst, '' end
  local c1 = tonumber(n1) or 0
  local wj = win[1]
  if kind == nil and c1 >= wj[2] then
    kind, count, max, window, retry = calls_trip(c1, wj[2], wj[1], w1[2], lnow)
  end
  if not w2 then
    return kind, count, max, retry, window, new .. w1[3] .. (c1 + 1), owed, burst, ''
  end
  local c2 = tonumber(n2) or 0
  wj = win[2]
  if kind == nil and c2 >= wj[2] then
    kind, count, max, window, retry = calls_trip(c2, wj[2], wj[1], w2[2], lnow)
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
  local tat_old = string.match(state, '^%d*')
  local kind, count, max, retry, new, owed
  kind, count, max, retry, new, owed, burst = rate_trip(T, tau, burst, tat_old, now)
  local window, shown = '', ''
  local parts = {new}  -- a rate that does not apply now keeps its time
  local kept = #tat_old  -- bytes of the old state this call rewrites
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
        kind, count, max, window, retry = calls_trip(n, wmax, per, w[2], lnow)
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
  if kind == 'fraud' then
    -- a fraud rule's answer (profile: the rule)
    rej = (FRAUD.by[profile] or EMPTY).rej or DEFAULT_REJECT
    return rej[1], rej[2], rej[3]
  end
  if e then
    if kind == 'rate' then rej = e.rrej else rej = e.rej end
  else
    rej = reject_of(profile)
  end
  if kind == 'rate' or kind == 'calls' then return rej[1], rej[2], retry end
  return rej[1], rej[2], rej[3]
end
