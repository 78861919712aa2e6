"""policer: call admission control for SIP proxies.

Kamailio-style dialog profiles kept in Redis and shared by every proxy
worker, limits from declarative YAML policies. The public API:

- :func:`policer.policy.load_policy` — read and validate a policy file;
- :class:`policer.call.Call` — one initial INVITE;
- :class:`policer.engine.Engine` — ``admit``, ``confirm``, ``refresh``,
  ``release``, dialog variables, ``explain``;
- :func:`policer.store.open_store` — the Redis or in-process store.
"""

__version__ = "0.1.0"
