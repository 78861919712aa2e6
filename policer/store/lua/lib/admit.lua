-- ------------------------------------------------------------------ admit (raw call)

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

-- One call from its raw attributes: classify, decide (mode 'a' admit, 'A' admit for a
-- node holding a lease, 'r' record, 'e' explain). Returns the reply (nil: the request
-- was settled before it arrived).
local function admit_call(node, call_id, from_tag, attrs, mode, now, at, early_ms, rq)
  local values = read_attrs(attrs)
  local cls, _, members, all = classify(values, at)
  local flags = 0
  if cls ~= '' and cls == EMERGENCY_CLASS then
    flags = FLAG_EMERGENCY
    if EMERGENCY_BYPASS then flags = flags + FLAG_BYPASS end
  end
  if mode == 'r' then flags = flags + FLAG_RECORD end
  if mode ~= 'A' then flags = flags + FLAG_REGISTER end
  local did = dialog_id(call_id, from_tag)
  local tail = ''
  if mode ~= 'e' then tail = #call_id .. ':' .. bounded(call_id) .. attrs end
  return decide(did, members, all, flags, early_ms or EARLY_MS, node, now, at, cls,
                max_duration(members, cls), mode == 'e', rq, tail, attrs)
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
    local hold = redis.call('HGET', COUNTS, '!hold')
    if hold and tonumber(hold) > now then
      return redis.error_reply('POLICER recovering: the counts are being restored from ' ..
                               'the proxies after Redis lost its state; the caller\'s ' ..
                               'fallback decides for a few seconds')
    end
  end
  local rq_s = nil
  if rq then rq_s = string.format('%d', rq) end
  local r = admit_call(args[1] or '', args[2] or '', args[3] or '', args[4] or '', mode, now,
                       at, nil, rq_s)
  if r == nil then return late_reply(now, rq or now) end
  if mode == 'A' then return native_reply(r) end
  return r
end
