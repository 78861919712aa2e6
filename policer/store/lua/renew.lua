-- policer: a node (one proxy: all its worker processes) renews its lease, and
-- sweeps the dialogs of nodes whose lease lapsed.
--
-- KEYS[1] node set (P .. 'nodes')
-- ARGV[1] P  ARGV[2] node (encoded)  ARGV[3] lease ms  ARGV[4] clock offset ms
-- ARGV[5] sweep batch  ARGV[6] sweep lost nodes (1|0)  ARGV[7] call-record MAXLEN
-- ARGV[8] 'renew' | 'start' (a node that starts afresh: its earlier dialogs are gone
--         with the process that held them, so they end now, `batch` at a time)
-- Returns {dialogs of lost nodes ended, own dialogs still to end (start mode)}.

local P = ARGV[1]
local node = ARGV[2]
local now = now_ms(ARGV[4])
local batch = tonumber(ARGV[5])
local cdr_maxlen = ARGV[7]
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), node)

local nkey = P .. 'n:' .. node
-- own dialogs that passed their deadline stop counting anyway: trim them (bounded)
local expired = redis.call('ZCOUNT', nkey, '-inf', now)
if expired > 0 then
  redis.call('ZREMRANGEBYRANK', nkey, 0, math.min(expired, batch) - 1)
end

local left = 0
if ARGV[8] == 'start' then
  local ids = redis.call('ZRANGE', nkey, 0, batch - 1)
  for _, did in ipairs(ids) do
    if not end_dialog(P, did, 'node_restarted', now, cdr_maxlen) then
      redis.call('ZREM', nkey, did)
    end
  end
  left = redis.call('ZCARD', nkey)
end

local swept = 0
if ARGV[6] == '1' then swept = sweep_lost_nodes(P, now, batch, cdr_maxlen) end
return {swept, left}
