-- ------------------------------------------------------------------ reads
-- Read-only (no-writes: also on replicas).

local function fn_read(keys, args)
  if args[1] == 'info' then
    -- with Redis's clock (the caller measures its offset), the state epoch and this
    -- server's VM_MARK (another one than the epoch's: the state may have been lost)
    local now = now_ms(args[2])
    local e = redis.call('HMGET', NS_PREFIX .. 'epoch', 'id', 'run')
    return {POLICY_HASH, POLICY_SOURCE, POLICY_VERSION, LIBRARY_FORMAT, now, e[1] or '',
            e[2] or '', vm_mark()}
  end
  -- 'size': the counts of these fields of P c (profile, profile:value, #confirmed), then
  -- now (ms)
  local now = now_ms(args[2])
  local out = {}
  if #args > 2 then
    local h = redis.call('HMGET', COUNTS, unpack(args, 3))
    for i = 1, #h do out[i] = tonumber(h[i]) or 0 end
  end
  out[#out + 1] = now
  return out
end
