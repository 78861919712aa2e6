-- policer_admitm_S: the decision over explicit memberships, for the store contract suite
-- (tests/support/explicit.py loads it into the library it tests; no proxy calls it)
--   ARGV[1] dialog id (encoded)  ARGV[2] early timeout ms  ARGV[3] 0 ordinary, 1 emergency
--   (may use the reserve), 2 emergency with bypass, 3 record (no limit checked)
--   ARGV[4] n members  ARGV[5] clock offset ms  ARGV[6] node (encoded)
--   ARGV[7] the class  ARGV[8] the packed tail (Call-ID, then attributes in ATTRS order)
--   then per member (6 values): profile, valued (1|0), encoded value, max (-1 none),
--   reserve, shadow (1|0). Reply: ADMIT_REPLY.
local function fn_admitm(keys, args)
  CALL.native, CALL.dir, CALL.gw = false, '', false
  local now = now_ms(args[5])
  local n = tonumber(args[4])
  local members = {}
  local at = 9
  for i = 1, n do
    local name, enc = args[at], args[at + 2]
    local p = {name = name, timed = false, idx = 0, entries = EMPTY}
    local rej = reject_of(name)
    local e = {max = tonumber(args[at + 3]), reserve = tonumber(args[at + 4]),
               shadow = args[at + 5] == '1', idx = 1, dur = -1, rej = rej, rrej = rej}
    local fld = name
    if args[at + 1] == '1' then fld = name .. ':' .. enc else enc = '' end
    members[i] = {p, e, enc, fld, {enc, fld, 'L|' .. fld, 'T|' .. fld}}
    at = at + 6
  end
  local flags = tonumber(args[3])
  if flags == 3 then flags = FLAG_RECORD
  elseif flags == 2 then flags = FLAG_EMERGENCY + FLAG_BYPASS end
  flags = flags + FLAG_REGISTER
  local plan = plan_entry(members, false, '')
  plan.md = -1
  return decide(args[1], plan, flags, tonumber(args[2]), args[6] or '', now, now,
                args[7] or '', false, nil, args[8] or '', nil)
end

redis.register_function('policer_admitm_' .. SUFFIX, fn_admitm)
