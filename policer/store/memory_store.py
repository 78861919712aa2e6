"""The in-process store: the same contract as the Redis store, in one process's
memory. It serves a single process with no Redis, and it is the model the Redis
store is tested against (one contract suite runs on both).

Its clock is ``time.time()`` plus ``clock_offset_ms``; tests move that offset to
jump time, exactly as they do with the Redis store.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from policer.call import key_part, utf8_text, value_from_key
from policer.store.base import (
    STATS_FIELDS,
    AdmitRequest,
    AdmitResult,
    CallRecord,
    DialogInfo,
)

__all__ = ["MemoryStore"]

_GRACE_MS = 60_000
_DECIDED_MS = 32_000
_SWEEP_BATCH = 100
_RENEW_BATCH = 200



@dataclass(slots=True)
class _Dialog:
    decision: AdmitResult
    state: str
    init_ms: int
    deadline: int = 0
    expires: int = 0  # when the record itself disappears
    start_ms: int = 0
    end_ms: int = 0
    end_reason: str = ""
    keys: tuple[tuple[str, str], ...] = ()  # (profile, encoded value or "")
    node: str = ""  # encoded node name, "" when the admitting node holds no lease
    labels: tuple[str, ...] = ()
    info: dict[str, str] = field(default_factory=dict)
    variables: dict[str, str] = field(default_factory=dict)


class MemoryStore:
    """Dialog profiles in this process's memory (thread-safe)."""

    def __init__(self, namespace: str, *, clock_offset_ms: int = 0,
                 cdr_maxlen: int = 100_000) -> None:
        self.namespace = namespace
        self.clock_offset_ms = clock_offset_ms
        self._lock = threading.Lock()
        self._dialogs: dict[str, _Dialog] = {}
        self._profiles: dict[tuple[str, str], dict[str, int]] = {}
        self._early: dict[str, int] = {}
        self._confirmed: dict[str, int] = {}
        self._stats: dict[str, int] = {}
        self._decisions: dict[tuple[str, str], int] = {}
        self._limits: dict[str, dict[str, int]] = {}
        self._cdr: deque[CallRecord] = deque(maxlen=cdr_maxlen)
        self._seq = itertools.count(1)
        self._nodes: dict[str, int] = {}  # encoded node -> end of its lease
        self._node_dialogs: dict[str, dict[str, int]] = {}  # node -> dialog id -> deadline
        self._admits = 0

    def now_ms(self) -> int:
        return int(time.time() * 1000) + self.clock_offset_ms

    def _record(self, did: str, now: int) -> _Dialog | None:
        d = self._dialogs.get(did)
        if d is not None and d.expires <= now:
            del self._dialogs[did]
            return None
        return d

    def _incr(self, key: str, n: int = 1) -> None:
        self._stats[key] = self._stats.get(key, 0) + n

    def _sweep(self, zset: dict[str, int], now: int) -> None:
        gone = sorted((d, did) for did, d in zset.items() if d <= now)[:_SWEEP_BATCH]
        for _, did in gone:
            del zset[did]
        if gone:
            self._incr("expired", len(gone))
            self._incr("ended:expired", len(gone))

    @staticmethod
    def _live(zset: dict[str, int], now: int) -> int:
        return sum(1 for d in zset.values() if d > now)

    def _prune(self, now: int) -> None:
        """Forget records and members past their time (the Redis store's key TTLs)."""
        for did in [did for did, d in self._dialogs.items() if d.expires <= now]:
            del self._dialogs[did]
        tables: tuple[dict[Any, dict[str, int]], ...] = (self._profiles, self._node_dialogs)
        for table in tables:
            for key in list(table):
                zset = table[key]
                for did in [did for did, deadline in zset.items() if deadline <= now]:
                    del zset[did]
                if not zset:
                    del table[key]

    def _sweep_lost_nodes(self, now: int, batch: int) -> int:
        done = 0
        for node in [n for n, until in sorted(self._nodes.items(), key=lambda kv: kv[1])
                     if until <= now][:4]:
            if done >= batch:
                break
            mine = self._node_dialogs.get(node, {})
            for did in sorted(mine, key=lambda x: (mine[x], x))[:batch - done]:
                d = self._record(did, now)
                if d is not None and self._end(did, d, "node_lost", now) is not None:
                    done += 1
                else:
                    mine.pop(did, None)
            if not mine:
                self._node_dialogs.pop(node, None)
                del self._nodes[node]
                self._incr("nodes_lost")
        return done

    # -- admission
    def admit(self, request: AdmitRequest) -> AdmitResult:
        with self._lock:
            now = self.now_ms()
            did = request.dialog_id
            self._admits += 1
            if self._admits % 1000 == 0:
                self._prune(now)
            prev = self._record(did, now)
            if prev is not None:
                p = prev.decision
                return AdmitResult(p.admitted, p.tripped, p.count, p.max, p.bypass, True, p.shadow)
            node = key_part(request.node) if request.node else ""
            if node and request.lease_ms > 0:
                self._nodes[node] = now + request.lease_ms
            if request.sweep_nodes:
                self._sweep_lost_nodes(now, 10)
            self._sweep(self._early, now)
            self._sweep(self._confirmed, now)
            emergency = request.emergency or request.emergency_bypass
            tripped, tcount, tmax, bypass, shadow = -1, 0, -1, False, -1
            keys: list[tuple[str, str]] = []
            for i, m in enumerate(request.members):
                enc = "" if m.value is None else key_part(m.value)
                keys.append((m.profile, enc))
                zset = self._profiles.get((m.profile, enc), {})
                mx = m.max
                if enc:
                    live_limit = self._limits.get(m.profile, {}).get(enc)
                    if live_limit is not None:
                        mx = live_limit
                if mx < 0 or request.record:
                    continue
                count = self._live(zset, now)
                effective = mx if emergency else mx - m.reserve
                if count >= effective:
                    if m.shadow:
                        if shadow < 0:
                            shadow = i
                            if tripped < 0:
                                tcount, tmax = count, effective
                    elif request.emergency_bypass:
                        if tripped < 0:
                            tripped, tcount, tmax = i, count, mx
                        bypass = True
                    else:
                        tripped, tcount, tmax = i, count, effective
                        break
            if tripped >= 0 and not bypass:
                result = AdmitResult(False, tripped, tcount, tmax, False, False, shadow)
                self._dialogs[did] = _Dialog(result, "rejected", now, expires=now + _DECIDED_MS)
                self._incr("rejected")
                prof = request.members[tripped].profile
                self._decisions[("rejected", prof)] = self._decisions.get(("rejected", prof), 0) + 1
                return result
            result = AdmitResult(True, tripped, tcount, tmax, bypass, False, shadow)
            deadline = now + request.early_ms
            labels = []
            for i, (m, key) in enumerate(zip(request.members, keys, strict=True)):
                self._profiles.setdefault(key, {})[did] = deadline
                labels.append(m.profile if m.value is None else f"{m.profile}={key[1]}")
                res = ("store_error" if request.record else "bypassed" if i == tripped
                       else "shadow_rejected" if i == shadow else "admitted")
                self._decisions[(res, m.profile)] = self._decisions.get((res, m.profile), 0) + 1
            self._early[did] = deadline
            if node:
                self._node_dialogs.setdefault(node, {})[did] = deadline
            self._dialogs[did] = _Dialog(
                result, "early", now, deadline=deadline, expires=deadline + _GRACE_MS,
                keys=tuple(keys), labels=tuple(labels), node=node,
                info={k: utf8_text(v) for k, v in request.info.items()},
            )
            self._incr("processed")
            if request.record:
                self._incr("recorded")
            if bypass:
                self._incr("bypassed")
            if shadow >= 0:
                self._incr("shadow_rejected")
            return result

    def _extend(self, did: str, confirm: bool, timeout_ms: int) -> bool:
        with self._lock:
            now = self.now_ms()
            d = self._record(did, now)
            if d is None or d.state not in ("early", "confirmed") or d.deadline <= now:
                return False  # past its deadline: gone for good (its slot may be taken)
            deadline = now + timeout_ms
            for key in d.keys:
                self._profiles.setdefault(key, {})[did] = deadline
            if d.node:
                self._node_dialogs.setdefault(d.node, {})[did] = deadline
            if confirm and d.state == "early":
                self._early.pop(did, None)
                d.state = "confirmed"
                d.start_ms = now
            (self._early if d.state == "early" else self._confirmed)[did] = deadline
            d.deadline = deadline
            d.expires = deadline + _GRACE_MS
            return True

    def confirm(self, dialog_id: str, dialog_ms: int) -> bool:
        return self._extend(dialog_id, True, dialog_ms)

    def refresh(self, dialog_id: str, timeout_ms: int) -> bool:
        return self._extend(dialog_id, False, timeout_ms)

    def release(self, dialog_id: str, reason: str) -> CallRecord | None:
        with self._lock:
            now = self.now_ms()
            d = self._record(dialog_id, now)
            return None if d is None else self._end(dialog_id, d, reason, now)

    def _end(self, dialog_id: str, d: _Dialog, reason: str, now: int) -> CallRecord | None:
        """End a live dialog (the Lua ``end_dialog``); None when it was not live."""
        if d.state not in ("early", "confirmed"):
            return None
        for key in d.keys:
            zset = self._profiles.get(key)
            if zset is not None:
                zset.pop(dialog_id, None)
                if not zset:
                    del self._profiles[key]
        if d.node:
            self._node_dialogs.get(d.node, {}).pop(dialog_id, None)
        self._early.pop(dialog_id, None)
        self._confirmed.pop(dialog_id, None)
        d.state, d.end_ms, d.end_reason = "ended", now, reason
        d.expires = now + _DECIDED_MS
        self._incr("ended")
        self._incr("ended:" + reason)
        if reason in ("failed", "cancel"):
            self._incr("failed")
        rec = CallRecord(
            dialog_id=dialog_id,
            call_id=d.info.get("call_id", ""),
            from_uri=d.info.get("from", ""),
            to_uri=d.info.get("to", ""),
            setup_ms=d.init_ms,
            answer_ms=d.start_ms,
            end_ms=now,
            reason=reason,
            node=d.info.get("node", ""),
            profiles=d.labels,
            variables=dict(d.variables),
            record_id=f"{now}-{next(self._seq)}",
        )
        self._cdr.append(rec)
        return rec

    # -- variables
    def set_var(self, dialog_id: str, name: str, value: str) -> bool:
        with self._lock:
            d = self._record(dialog_id, self.now_ms())
            if d is None or d.state not in ("early", "confirmed"):
                return False
            d.variables[utf8_text(name)] = utf8_text(value)
            return True

    def get_var(self, dialog_id: str, name: str) -> str | None:
        with self._lock:
            d = self._record(dialog_id, self.now_ms())
            return None if d is None else d.variables.get(utf8_text(name))

    # -- inspection
    def _info(self, did: str, d: _Dialog) -> DialogInfo:
        return DialogInfo(did, d.state, d.init_ms, d.start_ms, d.end_ms, d.deadline, d.labels,
                          dict(d.info), dict(d.variables), d.end_reason)

    def dialog(self, dialog_id: str) -> DialogInfo | None:
        with self._lock:
            d = self._record(dialog_id, self.now_ms())
            return None if d is None or d.state == "rejected" else self._info(dialog_id, d)

    def profile_size(self, profile: str, value: str | None = None) -> int:
        with self._lock:
            key = (profile, "" if value is None else key_part(value))
            return self._live(self._profiles.get(key, {}), self.now_ms())

    def profile_values(self, profile: str) -> dict[str, int]:
        with self._lock:
            now = self.now_ms()
            out = {}
            for (p, enc), zset in sorted(self._profiles.items()):
                if p == profile and enc:
                    n = self._live(zset, now)
                    if n:
                        out[value_from_key(enc)] = n
            return out

    def profile_list(self, profile: str, value: str | None = None) -> list[DialogInfo]:
        with self._lock:
            now = self.now_ms()
            key = (profile, "" if value is None else key_part(value))
            zset = self._profiles.get(key, {})
            out = []
            for did, deadline in sorted(zset.items(), key=lambda kv: (kv[1], kv[0])):
                d = self._record(did, now)
                if deadline > now and d is not None:
                    out.append(self._info(did, d))
            return out

    def stats(self) -> dict[str, int]:
        with self._lock:
            now = self.now_ms()
            out = {k: self._stats.get(k, 0) for k in STATS_FIELDS}
            out["early"] = self._live(self._early, now)
            out["confirmed"] = self._live(self._confirmed, now)
            out["active"] = out["early"] + out["confirmed"]
            return out

    def ended(self) -> dict[str, int]:
        with self._lock:
            return {k[6:]: v for k, v in self._stats.items() if k.startswith("ended:")}

    def decisions(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._decisions)

    # -- live limits
    def limit_get(self, profile: str, value: str) -> int | None:
        with self._lock:
            return self._limits.get(profile, {}).get(key_part(value))

    def limit_set(self, profile: str, value: str, maximum: int) -> int | None:
        with self._lock:
            table = self._limits.setdefault(profile, {})
            old = table.get(key_part(value))
            table[key_part(value)] = maximum
            return old

    def limit_unset(self, profile: str, value: str) -> int | None:
        with self._lock:
            return self._limits.get(profile, {}).pop(key_part(value), None)

    def limits(self, profile: str) -> dict[str, int]:
        with self._lock:
            return {value_from_key(k): v for k, v in self._limits.get(profile, {}).items()}

    def call_records(self, count: int = 100, after: str = "") -> list[CallRecord]:
        with self._lock:
            records = list(self._cdr)
        if after:
            ids = [r.record_id for r in records]
            records = records[ids.index(after) + 1:] if after in ids else records
        return records[:count]

    # -- nodes
    def renew(self, node: str, lease_ms: int, sweep: bool, start: bool = False
              ) -> tuple[int, int]:
        with self._lock:
            now = self.now_ms()
            enc = key_part(node)
            self._nodes[enc] = now + lease_ms
            mine = self._node_dialogs.get(enc, {})
            for did in [x for x, deadline in mine.items() if deadline <= now][:_SWEEP_BATCH]:
                del mine[did]
            left = 0
            if start:
                for did in sorted(mine, key=lambda x: (mine[x], x))[:_RENEW_BATCH]:
                    d = self._record(did, now)
                    if d is None or self._end(did, d, "node_restarted", now) is None:
                        mine.pop(did, None)
                left = len(mine)
            swept = self._sweep_lost_nodes(now, _RENEW_BATCH) if sweep else 0
            return swept, left

    def nodes(self) -> dict[str, int]:
        with self._lock:
            return {value_from_key(n): until for n, until in self._nodes.items()}

    def node_dialogs(self, node: str) -> list[str]:
        with self._lock:
            return sorted(self._node_dialogs.get(key_part(node), {}))

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        return None
