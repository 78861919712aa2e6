#!/bin/sh
# policer: join the three nodes of deploy/redis/cluster/ into one cluster
# (three primaries, no replicas). Start the nodes first.
set -eu
exec redis-cli -a "${REDISCLI_AUTH:-change-me-default}" --no-auth-warning \
    --cluster create 127.0.0.1:7000 127.0.0.1:7001 127.0.0.1:7002 \
    --cluster-replicas 0 --cluster-yes
