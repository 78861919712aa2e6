-- policer: end a dialog (BYE, CANCEL, failure, proxy timeout, operator). Idempotent.
--
-- KEYS[1] dialog hash (declared so that a Cluster client routes to its slot)
-- ARGV[1] dialog id  ARGV[2] reason  ARGV[3] clock offset ms  ARGV[4] stream MAXLEN (~)
-- ARGV[5] P (the namespace prefix)
-- Returns {} when the dialog was not live, else the call-end record as a flat list
-- {record id, field, value, ...}.

return end_dialog(ARGV[5], ARGV[1], ARGV[2], now_ms(ARGV[3]), ARGV[4]) or {}
