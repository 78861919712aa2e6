"""The lab: tools that run policer for real from a checkout of the repository (not
part of the installed package): a private ``redis-server`` launcher and free-port
helpers (:mod:`lab.redis_server`), the demo of ``bin/demo`` (:mod:`lab.demo`) and
``policer simulate`` (:mod:`lab.simulate`). The tests use them too.
"""
