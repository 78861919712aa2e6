-- ------------------------------------------------------------------ batches
-- Answers, ends and other dialog events, many in one call, in order (BATCH_OPS of
-- policer.store.protocol).

local function released(rec, with_records)
  if rec == nil then return 0 end
  if with_records then return rec end
  return 1
end

-- One op of a batch from position pos: {letter, dialog id, arg1, arg2, raw Call-ID} and
-- the next position; nil when the batch is malformed from here on. A line op (+ ~ -:
-- the encoded dialog id and one argument, as the cfg writes them from the id its admit
-- answered) is read with one match and stands as its letter C F R; a packed op
-- (OP_FIELDS) field by field.
local LINE_AS = {['+'] = 'C', ['~'] = 'F', ['-'] = 'R'}

local function read_op(ops, pos)
  local l, did, arg, nxt = string.match(ops, OP_LINE, pos)
  if l then return {LINE_AS[l], did, arg}, nxt end
  l = string.sub(ops, pos, pos)
  local n = OP_FIELDS[l]
  if n == nil then return nil end
  local f = {}
  pos = pos + 1
  for i = 1, n do
    local v
    v, pos = field_at(ops, pos)
    if v == nil then return nil end
    f[i] = v
  end
  if l == 'c' or l == 'f' or l == 'r' or l == 'u' then
    return {l, dialog_id(f[1], f[2]), f[3], nil, f[1]}, pos
  elseif l == 'v' then
    return {l, dialog_id(f[1], f[2]), f[3], f[4]}, pos
  elseif l == 'V' then
    return {l, f[1], f[2], f[3]}, pos
  elseif l == 'a' then
    return {l, f[1], f[2], f[3], f[4]}, pos
  elseif l == 'b' then
    return {l, f[1], f[2], f[3], f[4], redis_ms(f[5], f[6])}, pos
  elseif l == 'x' then
    return {l, dialog_id(f[1], f[2]), redis_ms(f[3], f[4])}, pos
  elseif l == 'X' then
    return {l, f[1], redis_ms(f[2], f[3])}, pos
  end
  return {l, f[1], f[2]}, pos  -- C F R
end

local function fn_batch(keys, args)
  local ops = args[1] or ''
  local with_records = args[2] == '1'
  local now = now_ms(args[3])
  local records_ok = args[4] == nil or args[4] == '' or args[4] == ATTRS_SIG
  CALL.native = false
  local list = {}
  local pos, len = 1, #ops
  while pos <= len do
    local op
    op, pos = read_op(ops, pos)
    if op == nil then break end
    list[#list + 1] = op
  end
  -- A call answered and ended within one batch (a short call): its answer needs no
  -- write of its own, the end records when it was answered.
  local ends = {}
  for i = 1, #list do
    local l = list[i][1]
    if l == 'r' or l == 'R' or l == 'u' then ends[list[i][2]] = i end
  end
  local answered = {}  -- dialog id -> when answered (its confirm's index in at[did])
  local at = {}
  local out = {}
  for i = 1, #list do
    local op = list[i]
    local l, did = op[1], op[2]
    local r = 0
    if l == 'c' or l == 'C' then
      local e = ends[did]
      if e and e > i then
        answered[did] = NOW_S
        at[did] = i
        r = 1
      else
        r = extend(did, true, num(op[3]) or DIALOG_MS, now)
      end
    elseif l == 'f' or l == 'F' then
      r = extend(did, false, num(op[3]) or DIALOG_MS, now)
    elseif l == 'r' or l == 'R' or l == 'u' then
      local rec, ahead
      if l == 'u' then  -- a BYE of a dialog another proxy set up: either tag may name it
        rec, ahead = end_dialog(did, 'bye', now, answered[did])
        if rec == nil then
          local other = nil
          if op[3] ~= '' then
            other = dialog_id(op[5], op[3])
            rec = end_dialog(other, 'bye', now)
          end
          if rec == nil then  -- neither is live: those not known (yet) stay ended
            end_dialog(did, 'bye', now, nil, false, true)
            if other then end_dialog(other, 'bye', now, nil, false, true) end
          end
        end
      else
        rec, ahead = end_dialog(did, op[3], now, answered[did], false, true)
      end
      -- the answer of this batch found the dialog live (as a confirm of its own would)?
      if at[did] and not (rec and ahead) then out[at[did]] = 0 end
      r = released(rec, with_records)
    elseif l == 'v' or l == 'V' then
      r = set_var(did, bounded(op[3]), bounded(op[4]), now)
    elseif (l == 'a' or l == 'b') and records_ok then
      -- a call the proxy's fallback admitted ('b': decided at op[6], Redis's clock): it
      -- counts from then until its early deadline, unless its release came first
      local early = nil
      if l == 'b' and op[6] then early = op[6] + EARLY_MS - now end
      if early == nil or early > 0 then
        local reply = admit_call(key_part(op[2]), op[3], op[4], op[5], 'r', now, now, early)
        if reply[R_DUPLICATE] == 1 then r = 0 else r = 1 end
      end
    elseif (l == 'x' or l == 'X') and op[3] then
      r = void(did, op[3], now)
    end
    out[#out + 1] = r
  end
  delta_flush()
  return out
end

