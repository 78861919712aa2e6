-- ------------------------------------------------------------------ egress
-- policer_egress_S: may a live dialog be sent to a gateway? The profiles whose value is
-- where a call is sent (value: gateway, and the hierarchy levels above them) are joined
-- per attempt: the dialog leaves the gateway of its last attempt and joins this one's
-- if every such limit has room (all or none, the limits of the admit: concurrent, rate,
-- calls, schedules, shadow, the emergency bypass). Full, it holds no gateway: the proxy
-- tries the next one. The dialog keeps the gateway it was answered through until it
-- ends. policer.store.memory_store's egress is the same rule (the model).

-- The record's count fields: those of profiles joined per attempt (held), the rest.
local function gateway_fields(members_s)
  local held, rest = {}, {}
  for f in string.gmatch(members_s, '[^,]+') do
    local p = PLAN_BY_NAME[string.match(f, '^[^:]+')]
    if p and p.gw then held[#held + 1] = f else rest[#rest + 1] = f end
  end
  return held, rest
end

local function egress(did, gw, now)
  local rec = get_record(did, now)
  if rec == nil or not is_live(rec) then
    -- a dialog the store does not know (a call its proxy's fallback admitted, not
    -- recorded yet): it passed admission, it may go; nothing is counted
    return egress_reply(1, 200, 'OK', -1, '', 0, -1, '', '', 0, 0, 0)
  end
  local held, rest = gateway_fields(rec.members)
  local plan = nil
  if gw ~= '' and GATEWAY_ATTR > 0 then
    -- the call's attributes as its admit carried them (in this library's order only when
    -- this policy admitted it), and this attempt's gateway
    local values = {}
    if rec.sig == ATTRS_SIG then
      local _, pos = field_at(rec.tail, 1)
      if pos then values = read_attrs(string.sub(rec.tail, pos)) end
    end
    values[GATEWAY_ATTR] = gw
    local dir = ''
    if DIRECTIONS then dir = IP.direction(values[SOURCE_IP_ATTR] or '') end
    local mow = 0
    if SCHEDULED then mow = minute_of_week(now) end
    plan = build_plan(values, rec.class, dir, mow, true)
  end
  local members = EMPTY
  if plan then members = plan.members end
  local n = #members
  local was = {}
  for i = 1, #held do was[held[i]] = true end
  local tripped, tcount, tmax, tkind, tretry, twin, bypass, shadow = 0, 0, -1, '', -1, '', 0, 0
  local counts, spend = nil, nil
  local limit, lentry = '', nil
  if n > 0 then
    local h = redis.call('HMGET', COUNTS, unpack(plan.hm))
    if h[1] and tonumber(h[1]) > now then return recovering_reply() end
    -- a gateway it holds already (asked again) counts it once
    for i = 1, n do
      local k = plan.pos[i]
      if was[plan.fields[i]] then h[k] = ns(math.max(0, (num(h[k]) or 0) - 1)) end
    end
    local emergency = dec_unpack(rec.decision).emergency == '1'
    tripped, tcount, tmax, tkind, tretry, twin, bypass, shadow, counts, spend =
      check_members(plan, h, emergency, emergency and EMERGENCY_BYPASS, false, false, now,
                    now)
    limit, lentry = named_limit(plan, tripped, shadow)
  end
  local taken = tripped == 0 or bypass == 1
  -- the gateway of the last attempt is left, whatever this one gets
  local joined = {}
  if taken then joined = plan and plan.fields or EMPTY end
  local now_in = {}
  for i = 1, #joined do now_in[joined[i]] = true end
  local changed = false
  for i = 1, #held do
    if not now_in[held[i]] then
      delta_one(held[i], -1)
      changed = true
    end
  end
  if taken then
    local w, wn = {}, 0
    for i = 1, n do
      local f = plan.fields[i]
      if not was[f] then
        if DELTA_N == 0 then
          w[wn + 1] = f
          w[wn + 2] = ns(counts[i] + 1)
          wn = wn + 2
        else
          delta_one(f, 1)
        end
        if spend and spend[i] then
          w[wn + 1] = members[i][5][4]
          w[wn + 2] = spend[i]
          wn = wn + 2
        end
        changed = true
      end
    end
    if wn > 0 then redis.call('HSET', COUNTS, unpack(w, 1, wn)) end
  end
  delta_flush()
  if changed then
    for i = 1, #joined do rest[#rest + 1] = joined[i] end
    redis.call('SET', P_DIALOG .. did,
               rec_pack(rec.state, rec.deadline, rec.start, rec.cap, rec.md, rec.reason,
                        rec.node, rec.vars, table.concat(rest, ','), rec.init, rec.q,
                        rec.class, rec.sig, rec.decision, rec.tail), 'KEEPTTL')
  end
  local shw = 0
  if shadow > 0 then shw = 1 end
  if not taken then
    -- counted per tripped profile, cluster-wide (the exporter's policer_decisions,
    -- result egress_full): a gateway that is full all the time shows
    redis.call('HINCRBY', DECISIONS, 'egress;egress_full|' .. limit, '1')
    local code, reason, retry = answer_of(limit, lentry, tkind, tretry)
    return egress_reply(0, code, reason, retry, limit, tcount, tmax, tkind, '', 1, 0, 0)
  end
  local labels = ''
  if n > 0 then labels = labels_of(members) end
  return egress_reply(1, 200, 'OK', -1, limit, tcount, tmax, tkind, labels, 1, bypass, shw)
end

-- KEYS[1] P. ARGV[1] the dialog id (encoded, as the admit answered it), ARGV[2] the
-- gateway (raw; '' leaves the dialog's gateway), ARGV[3] clock offset ms, ARGV[4]
-- ARGV[5] the caller's deadline as the admit's ARGV[9] ARGV[10] (past it nothing is
-- written: the error 'POLICER late ...'). Reply: EGRESS_REPLY.
local function fn_egress(keys, args)
  local now = now_ms(args[3])
  local rq = redis_ms(args[4], args[5])
  if rq and now > rq then return late_reply(now, rq) end
  return egress(args[1] or '', args[2] or '', now)
end
