/* The floor of policer's decision function written in C, as a Redis module: the very
 * commands of floor.lua (its twin; read it for what each one does), made through
 * RedisModule_Call with the same fixed arguments and no other logic. A measuring tool
 * for issue 16 ("what would reach 2.5x a PING"), not part of policer.
 *
 *   FLOOR.CMDS node did-prefix ...     an admit's commands; an admit's 8-entry reply
 *   FLOOR.ANSWER did ...               per dialog: GET, SET KEEPTTL; the number
 *   FLOOR.HANGUP did ...               per dialog: GET, ZREM, SET PX, XADD; then HSET of
 *                                      the counts, HINCRBY of the end counter; the number
 *
 * Built by benchmarks.floor against the redismodule.h of the server's own version. */
#include <stdio.h>
#include <string.h>
#include "redismodule.h"

#define P "policer:{floor}:"
#define CALL "5:c1-2@b9:555123402:u111:b.example"
#define MEMBERS "total,domestic,user:u1,account:a1|1796400000000|1796400000000|domestic|" \
                "abcdef|1,0,0,-1,0,0,0,0,-1,-1,1,,\n" CALL
static const char *REC = "early|1796400000000|0|0|-1||node|0|" MEMBERS;
static const char *ANSWERED = "confirmed|1796403600000|1796400001000|0|-1||node|0|" MEMBERS;
static const char *ENDED = "ended|1796400002000|1796400001000|0|-1|bye|node|0|" MEMBERS;

static long long n = 0;

static void call(RedisModuleCallReply *r) {
    if (r) RedisModule_FreeCallReply(r);
}

static int cmds(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc < 3) return RedisModule_WrongArity(ctx);
    size_t len;
    const char *prefix = RedisModule_StringPtrLen(argv[2], &len);
    char did[256], key[320];
    n++;
    snprintf(did, sizeof did, "%.*s%lld", (int)len, prefix, n);
    snprintf(key, sizeof key, P "d:%s", did);
    call(RedisModule_Call(ctx, "TIME", ""));
    call(RedisModule_Call(ctx, "HMGET", "cccccccccccc", P "c", "!hold", "total", "domestic",
                          "user:u1", "L|user:u1", "R|user:u1", "T|user:u1", "account:a1",
                          "L|account:a1", "R|account:a1", "T|account:a1"));
    call(RedisModule_Call(ctx, "SET", "!cccccc", key, REC, "NX", "GET", "PX", "86520000"));
    call(RedisModule_Call(ctx, "HSET", "!ccccccccc", P "c", "total", "5", "domestic", "5",
                          "user:u1", "3", "account:a1", "3"));
    call(RedisModule_Call(ctx, "ZADD", "!ccc", P "n:node", "1796400120000", did));
    call(RedisModule_Call(ctx, "HINCRBY", "!ccc", P "decisions", "admitted;admitted|total",
                          "1"));
    call(RedisModule_Call(ctx, "XADD", "!ccccccccccc", P "attempts", "MAXLEN", "~", "100000",
                          "*", "d", did, "a", "a|1796400000000|domestic|node|abcdef|200||",
                          "x", CALL));
    RedisModule_ReplyWithArray(ctx, 8);
    RedisModule_ReplyWithLongLong(ctx, 1);
    RedisModule_ReplyWithLongLong(ctx, 200);
    RedisModule_ReplyWithSimpleString(ctx, "OK");
    RedisModule_ReplyWithLongLong(ctx, -1);
    RedisModule_ReplyWithLongLong(ctx, 0);
    RedisModule_ReplyWithLongLong(ctx, 0);
    RedisModule_ReplyWithLongLong(ctx, -1);
    RedisModule_ReplyWithStringBuffer(ctx, did, strlen(did));
    return REDISMODULE_OK;
}

static int answer(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    char key[320];
    for (int i = 1; i < argc; i++) {
        size_t len;
        const char *did = RedisModule_StringPtrLen(argv[i], &len);
        snprintf(key, sizeof key, P "d:%.*s", (int)len, did);
        call(RedisModule_Call(ctx, "GET", "c", key));
        call(RedisModule_Call(ctx, "SET", "!ccc", key, ANSWERED, "KEEPTTL"));
    }
    RedisModule_ReplyWithLongLong(ctx, argc - 1);
    return REDISMODULE_OK;
}

static int hangup(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    char key[320];
    for (int i = 1; i < argc; i++) {
        size_t len;
        const char *did = RedisModule_StringPtrLen(argv[i], &len);
        snprintf(key, sizeof key, P "d:%.*s", (int)len, did);
        RedisModuleCallReply *raw = RedisModule_Call(ctx, "GET", "c", key);
        size_t rlen = 0;
        const char *rec = raw ? RedisModule_CallReplyStringPtr(raw, &rlen) : NULL;
        if (rec == NULL) { rec = REC; rlen = strlen(REC); }
        call(RedisModule_Call(ctx, "ZREM", "!cs", P "n:node", argv[i]));
        call(RedisModule_Call(ctx, "SET", "!cccc", key, ENDED, "PX", "32000"));
        call(RedisModule_Call(ctx, "XADD", "!ccccccscccccb", P "cdr", "MAXLEN", "~", "100000",
                              "*", "d", argv[i], "r", "bye", "e", "1796400002000", "x",
                              rec, rlen));
        call(raw);
    }
    call(RedisModule_Call(ctx, "HSET", "!ccccccccc", P "c", "total", "0", "domestic", "0",
                          "user:u1", "0", "account:a1", "0"));
    call(RedisModule_Call(ctx, "HINCRBY", "!ccl", P "stats", "ended:bye",
                          (long long)(argc - 1)));
    RedisModule_ReplyWithLongLong(ctx, argc - 1);
    return REDISMODULE_OK;
}

int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv; (void)argc;
    if (RedisModule_Init(ctx, "floor", 1, REDISMODULE_APIVER_1) == REDISMODULE_ERR)
        return REDISMODULE_ERR;
    if (RedisModule_CreateCommand(ctx, "floor.cmds", cmds, "write", 0, 0, 0) ==
            REDISMODULE_ERR ||
        RedisModule_CreateCommand(ctx, "floor.answer", answer, "write", 0, 0, 0) ==
            REDISMODULE_ERR ||
        RedisModule_CreateCommand(ctx, "floor.hangup", hangup, "write", 0, 0, 0) ==
            REDISMODULE_ERR)
        return REDISMODULE_ERR;
    return REDISMODULE_OK;
}
