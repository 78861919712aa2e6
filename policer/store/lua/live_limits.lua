-- One change of a value's live limits, made inside Redis in one step (RedisStore's
-- _swap_live, `policer limits ...`, and the layout upgrade's merge of old live caps).
-- Every admit writes the counts hash, so a read, change and write guarded by WATCH on
-- it would be retried for as long as calls keep coming: this script is not a library
-- function (EVALSHA), so it works whatever library, if any, the namespace has loaded.
--
-- A value's live limits field ('L|<field>' in the counts hash): '<max>' (may be empty)
-- then its live caps' items ',<item>=<value>' (item 'R': the rate 'max:per ms:burst';
-- item '<per>': a window cap's max). The items keep their order; a changed or new item
-- goes last (policer.store.redis_store's _live_items reads the same; the library's
-- live_of and limits.lua the live max and the caps).
--
-- KEYS[1]  the namespace's counts hash (P c)
-- ARGV[1]  'swap': one item set or removed; 'merge': an older layout's caps field moved in
-- ARGV[2]  the value's live limits field ('L|<field>')
-- ARGV[3]  the live version's field of the counts hash, and ARGV[4] its new token (the
--          library's plans built before are stale: they keep their members' live limits)
-- swap:    ARGV[5] the item ('' the live max, 'R' the rate, '<per>' a window cap),
--          ARGV[6] '1' set it to ARGV[7], '0' remove it; ARGV[8] the value's state field
--          ('T|<field>'): a changed rate starts afresh, so its state (the theoretical
--          arrival time, before the first '|') is dropped, its windows stay
-- merge:   ARGV[5] the older layout's caps field ('R|<field>', removed), ARGV[6] its
--          text (items; its live max ignored): the value's own items win
-- Reply:   swap: the item's previous value (nil: none); merge: 1

local counts, op, field = KEYS[1], ARGV[1], ARGV[2]

-- the items of a live limits field: their names in order, and their values by name
local function items_of(text)
  local names, values = {}, {}
  if not text or text == '' then return names, values end
  local function put(k, v)
    if values[k] == nil then names[#names + 1] = k end
    values[k] = v
  end
  local head, rest = string.match(text, '^([^,]*)(.*)$')
  if head ~= '' then put('', head) end
  for item in string.gmatch(rest, ',([^,]*)') do
    local k, v = string.match(item, '^([^=]*)=(.*)$')
    if k then put(k, v) end
  end
  return names, values
end

local function text_of(names, values)
  local out = {values[''] or ''}
  for _, k in ipairs(names) do
    if k ~= '' and values[k] ~= nil then out[#out + 1] = ',' .. k .. '=' .. values[k] end
  end
  return table.concat(out)
end

local names, values = items_of(redis.call('HGET', counts, field))
local reply = 1
if op == 'swap' then
  local item = ARGV[5]
  reply = values[item]
  if reply ~= nil then values[item] = nil end
  if ARGV[6] == '1' then
    local kept = {}
    for _, k in ipairs(names) do
      if k ~= item then kept[#kept + 1] = k end
    end
    kept[#kept + 1] = item
    names, values[item] = kept, ARGV[7]
  end
  if item == 'R' then
    local state = redis.call('HGET', counts, ARGV[8])
    if state then
      local windows = string.match(state, '^[^|]*|(.*)$') or ''
      if windows ~= '' then
        redis.call('HSET', counts, ARGV[8], '|' .. windows)
      else
        redis.call('HDEL', counts, ARGV[8])
      end
    end
  end
else
  local onames, ovalues = items_of(ARGV[6])
  for _, k in ipairs(onames) do
    if k ~= '' and values[k] == nil then
      names[#names + 1], values[k] = k, ovalues[k]
    end
  end
  redis.call('HDEL', counts, ARGV[5])
end
local text = text_of(names, values)
if text ~= '' then
  redis.call('HSET', counts, field, text)
else
  redis.call('HDEL', counts, field)
end
redis.call('HSET', counts, ARGV[3], ARGV[4])
return reply
