"""The store contract's calling convention over explicit memberships: the in-process
model decides :class:`AdmitRequest` s itself; the Redis store gets a test-only entry
point, ``policer_admitm_S`` (``tests/lua/admitm.lua``), appended to the library it
loads. No proxy calls it: the production library has no such function."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from policer.call import pack_fields
from policer.store import AdmitRequest, AdmitResult, RedisStore, Store
from policer.store.keys import key_part

ADMITM = (Path(__file__).resolve().parents[1] / "lua" / "admitm.lua").read_text()


class ExplicitStore(Store, Protocol):
    """A store the contract suite drives over explicit memberships (both kinds)."""

    def admit(self, request: AdmitRequest) -> AdmitResult:
        """Check every limit, join all profiles or none."""


class ExplicitRedisStore(RedisStore):
    """A Redis store whose library also decides over explicit memberships."""

    extra_lua = (ADMITM,)

    def admit_arguments(self, request: AdmitRequest) -> list[Any]:
        """ARGV of ``policer_admitm_S`` for a request over explicit memberships."""
        info = dict(request.info)  # kept as sent (pack_fields keeps the raw bytes)
        # the admitting node is the one the record shows (the model keeps info as given)
        node_name = request.node or info.get("node", "")
        node = key_part(node_name) if node_name else ""
        user, _, domain = info.get("from", "").partition("@")
        values = {"ruri_user": info.get("to", ""), "from_user": user, "from_domain": domain,
                  "source_ip": info.get("source_ip", "")}
        tail = pack_fields([info.get("call_id", ""),
                            *(values.get(s, "") for s in self.library.attributes)])
        args: list[Any] = [
            request.dialog_id,
            request.early_ms,
            3 if request.record else 2 if request.emergency_bypass else 1 if request.emergency
            else 0,
            len(request.members),
            self.clock_offset_ms,
            node,
            info.get("class", ""),
            tail,
        ]
        for m in request.members:
            args += ((m.profile, 0, "", m.max, m.reserve, int(m.shadow)) if m.value is None
                     else (m.profile, 1, key_part(m.value), m.max, m.reserve, int(m.shadow)))
        return args

    def admit(self, request: AdmitRequest) -> AdmitResult:
        r = self._fcall("admitm", self.admit_arguments(request))
        return AdmitResult(
            admitted=r[0] == 1,
            tripped=int(r[10]) - 1,
            count=int(r[5]),
            max=int(r[6]),
            bypass=r[7] == 1,
            duplicate=r[8] == 1,
            shadow=int(r[9]) - 1,
            kind=str(r[15]),
            retry_after=int(r[3]) if str(r[15]) in ("rate", "calls") else -1,
            window=str(r[16]),
            max_duration_ms=int(r[17]) if int(r[17]) > 0 else None,
        )
