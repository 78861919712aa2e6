-- ------------------------------------------------------------------ functions

redis.register_function('policer_admit_' .. SUFFIX, fn_admit)
redis.register_function('policer_egress_' .. SUFFIX, fn_egress)
redis.register_function('policer_batch_' .. SUFFIX, fn_batch)
redis.register_function('policer_tick_' .. SUFFIX, fn_tick)
redis.register_function{function_name = 'policer_read_' .. SUFFIX, callback = fn_read,
                        flags = {'no-writes'}}
