-- ------------------------------------------------------------------ admit (raw call)

-- One call from its raw attributes: classify, decide (mode 'a' admit, 'A' admit for a
-- node holding a lease, 'r' record, 'e' explain). Admits (a, A) are held while P c's
-- '!hold' is ahead. Returns the reply (nil: the request was settled before it arrived;
-- HOLD: admits are held).
local function admit_call(node, call_id, from_tag, attrs, mode, now, at, early_ms, rq)
  local values = read_attrs(attrs)
  local cls, number, plan = classify(values, at)
  CALL.number = number
  CALL.dir = plan.dir
  CALL.gw = GATEWAY_ATTR > 0 and (values[GATEWAY_ATTR] or '') ~= ''
  local flags = 0
  if cls ~= '' and cls == EMERGENCY_CLASS then
    flags = FLAG_EMERGENCY
    if EMERGENCY_BYPASS then flags = flags + FLAG_BYPASS end
  end
  if mode == 'r' then flags = flags + FLAG_RECORD end
  if mode ~= 'A' then flags = flags + FLAG_REGISTER end
  if mode == 'a' or mode == 'A' then flags = flags + FLAG_HOLD end
  local did = dialog_id(call_id, from_tag)
  local tail = ''
  if mode ~= 'e' then
    call_id = bounded(call_id)
    tail = ns(#call_id) .. ':' .. call_id .. attrs
  end
  local r = decide(did, plan, flags, early_ms or EARLY_MS, node, now, at, cls, mode == 'e',
                   rq, tail, attrs)
  if r == ANSWER.stale then
    -- a live parent or live limit changed since the plan was built: built again on what
    -- is there now
    cls, number, plan = classify(values, at, true)
    CALL.dir = plan.dir
    r = decide(did, plan, flags, early_ms or EARLY_MS, node, now, at, cls, mode == 'e', rq,
               tail, attrs)
  end
  return r
end

local function late_reply(now, rq)
  local when = 'its fallback settled it'
  if now > rq then when = 'it stopped waiting ' .. (now - rq) .. ' ms ago' end
  return redis.error_reply('POLICER late: the caller gave up on this admit (' .. when ..
                           '); nothing was written, its fallback decides')
end

-- Redis lost its state and the proxies are putting their calls back: the counts are not
-- whole yet, so no limit is decided on them (the callers' fallback decides)
local function recovering_reply()
  return redis.error_reply('POLICER recovering: the counts are being restored from ' ..
                           'the proxies after Redis lost its state; the caller\'s ' ..
                           'fallback decides for a few seconds')
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
  end
  local rq_s = nil
  if rq then rq_s = ns(rq) end
  CALL.native = mode == 'A'
  local r = admit_call(args[1] or '', args[2] or '', args[3] or '', args[4] or '', mode, now,
                       at, nil, rq_s)
  CALL.native = false
  if r == nil then return late_reply(now, rq or now) end
  if r == ANSWER.hold then return recovering_reply() end
  return r
end
