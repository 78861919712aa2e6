#!lua name=floor
-- The floor of policer's decision function written in Lua: the Redis commands a whole
-- call makes over the data model (a call joining 4 profiles), with fixed arguments and
-- no other logic. benchmarks/floor/floor.c makes the very same commands from C, in a
-- Redis module. Used by benchmarks.instructions (callgrind) and benchmarks.floor (CPU).
--
-- empty(KEYS[1], 10 ARGV)   returns 1: the fixed cost of a function call
-- cmds(KEYS[1], ARGV[2] a dialog id prefix, ...)   an admit's commands: TIME, HMGET of
--     the fields a 4-membership call reads, SET NX GET of its record, HSET of 4 counts,
--     ZADD to the node index, HINCRBY of the decision counter, XADD of an attempt;
--     returns an admit's 8-entry reply
-- answer(KEYS[1], ARGV dialog ids)   per dialog: GET its record, SET it KEEPTTL;
--     returns the number of dialogs
-- hangup(KEYS[1], ARGV dialog ids)   per dialog: GET its record, ZREM from the node
--     index, SET it ended PX 32 s, XADD a call-end record; then one HSET of the 4
--     counts and one HINCRBY of the end counter for the batch; returns the number
local P = 'policer:{floor}:'
local n = 0
local REC = 'early|1796400000000|0|0|-1||node|0|total,domestic,user:u1,account:a1|' ..
            '1796400000000|1796400000000|domestic|abcdef|1,0,0,-1,0,0,0,0,-1,-1,1,,\n' ..
            '5:c1-2@b9:555123402:u111:b.example'
local ANSWERED = 'confirmed|1796403600000|1796400001000|0|-1||node|0|total,domestic,' ..
                 'user:u1,account:a1|1796400000000|1796400000000|domestic|abcdef|1,0,0,' ..
                 '-1,0,0,0,0,-1,-1,1,,\n5:c1-2@b9:555123402:u111:b.example'
local ENDED = 'ended|1796400002000|1796400001000|0|-1|bye|node|0|total,domestic,' ..
              'user:u1,account:a1|1796400000000|1796400000000|domestic|abcdef|1,0,0,' ..
              '-1,0,0,0,0,-1,-1,1,,\n5:c1-2@b9:555123402:u111:b.example'

redis.register_function('empty', function(keys, args) return 1 end)

redis.register_function('cmds', function(keys, args)
  n = n + 1
  local did = args[2] .. n
  redis.call('TIME')
  redis.call('HMGET', P .. 'c', '!hold', 'total', 'domestic', 'user:u1', 'L|user:u1',
             'R|user:u1', 'T|user:u1', 'account:a1', 'L|account:a1', 'R|account:a1',
             'T|account:a1')
  redis.call('SET', P .. 'd:' .. did, REC, 'NX', 'GET', 'PX', '86520000')
  redis.call('HSET', P .. 'c', 'total', '5', 'domestic', '5', 'user:u1', '3', 'account:a1', '3')
  redis.call('ZADD', P .. 'n:node', '1796400120000', did)
  redis.call('HINCRBY', P .. 'decisions', 'admitted;admitted|total', '1')
  redis.call('XADD', P .. 'attempts', 'MAXLEN', '~', '100000', '*', 'd', did,
             'a', 'a|1796400000000|domestic|node|abcdef|200||',
             'x', '5:c1-2@b9:555123402:u111:b.example')
  return {1, 200, 'OK', -1, 0, 0, -1, did}
end)

redis.register_function('answer', function(keys, args)
  for i = 1, #args do
    local key = P .. 'd:' .. args[i]
    redis.call('GET', key)
    redis.call('SET', key, ANSWERED, 'KEEPTTL')
  end
  return #args
end)

redis.register_function('hangup', function(keys, args)
  for i = 1, #args do
    local did = args[i]
    local key = P .. 'd:' .. did
    local raw = redis.call('GET', key) or REC
    redis.call('ZREM', P .. 'n:node', did)
    redis.call('SET', key, ENDED, 'PX', '32000')
    redis.call('XADD', P .. 'cdr', 'MAXLEN', '~', '100000', '*', 'd', did, 'r', 'bye',
               'e', '1796400002000', 'x', raw)
  end
  redis.call('HSET', P .. 'c', 'total', '0', 'domestic', '0', 'user:u1', '0', 'account:a1', '0')
  redis.call('HINCRBY', P .. 'stats', 'ended:bye', #args)
  return #args
end)
