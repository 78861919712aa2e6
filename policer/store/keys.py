"""The Redis key layout of one namespace, as the decision function
(``policer/store/lua/library.lua``) writes it; Python reads with it. Every key carries
the hash tag ``{NAMESPACE}``, so all keys of a namespace sit in one Redis Cluster slot
and one function call may touch any of them.

=====================================  =========  ==========================================
key                                    type       holds
=====================================  =========  ==========================================
``policer:{ns}:d:<dialog id>``         hash       one dialog: state, times, keys, info, vars
``policer:{ns}:p:<profile>``           zset       no-value profile: dialog id -> deadline ms
``policer:{ns}:p:<profile>:<value>``   zset       valued profile, one per value
``policer:{ns}:l:<profile>``           hash       live limits: value -> max, and
                                                  ``value|L`` live rate and window caps
                                                  (``,R=max:per_ms:burst``, ``,<per>=max``)
``policer:{ns}:t``                     hash       rate and calendar state: ``<profile>``
                                                  or ``<profile>:<value>`` -> GCRA arrival
                                                  time (us), then ``|<per>=<id>:<count>``
``policer:{ns}:sweep``                 string     the tick's HSCAN cursor over ``t``
``policer:{ns}:n:<node>``              zset       a node's dialogs -> deadline ms
``policer:{ns}:nidx``                  set        nodes that have an ``n:<node>`` index
``policer:{ns}:nodes``                 zset       nodes holding a lease -> its end (ms)
``policer:{ns}:confirmed``             zset       answered dialogs -> deadline ms
``policer:{ns}:stats``                 hash       ``ended:<reason>``, ``nodes_lost``
``policer:{ns}:decisions``             hash       ``kind;result|profile,...`` -> decisions
``policer:{ns}:cdr``                   stream     call-end records (capped)
``policer:{ns}:attempts``              stream     decided attempts, one per dialog (capped)
=====================================  =========  ==========================================

Values from SIP are encoded with :func:`policer.call.key_part` (the function's
``key_part`` in Lua) before they become part of a key or a hash field.
"""

from __future__ import annotations

from dataclasses import dataclass

from policer.call import key_part

__all__ = ["Keys"]


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str

    @property
    def prefix(self) -> str:
        return f"policer:{{{self.namespace}}}:"

    def dialog(self, dialog_id: str) -> str:
        return f"{self.prefix}d:{dialog_id}"

    def profile(self, profile: str, value: str | None = None) -> str:
        if value is None:
            return f"{self.prefix}p:{profile}"
        return f"{self.prefix}p:{profile}:{key_part(value)}"

    def profile_pattern(self, profile: str) -> str:
        """SCAN pattern of every value key of a valued profile."""
        return f"policer:{{{_glob_escape(self.namespace)}}}:p:{_glob_escape(profile)}:*"

    def limits(self, profile: str) -> str:
        return f"{self.prefix}l:{profile}"

    @property
    def confirmed(self) -> str:
        return f"{self.prefix}confirmed"

    @property
    def stats(self) -> str:
        return f"{self.prefix}stats"

    @property
    def decisions(self) -> str:
        return f"{self.prefix}decisions"

    @property
    def cdr(self) -> str:
        return f"{self.prefix}cdr"

    @property
    def attempts(self) -> str:
        return f"{self.prefix}attempts"


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)
