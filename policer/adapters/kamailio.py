"""Kamailio glue shared by both flavours of the Kamailio integration.

* native (``deploy/kamailio/policer.cfg``): the cfg decides every INVITE itself, one
  ``FCALL`` of the policy's admit function through ``ndb_redis``, and queues dialog
  events in Kamailio's ``mqueue``, applied by a cfg ``rtimer`` route in batches (see
  :mod:`policer.adapters.kamailio_cfg`). No SIP worker runs Python. Python lives in
  Kamailio's timer process only: :func:`start` in ``mod_init`` (before the fork) and
  :class:`NativeHandler` ``tick`` once a second (:class:`NativeTimer`: the engine's
  tick, the policy file, the htables the cfg's fallback reads, metrics).
* KEMI (``deploy/kamailio/policer_kemi.py``): routing in Python. An INVITE is one
  engine round trip (:func:`admit_current`, :func:`reject_current`,
  :func:`manage_current`: dialog tracking, with the call's max duration); dialog events
  (:func:`dialog_event`, :func:`release_current`, :func:`release_unknown`) are queued
  in the same ``mqueue`` and applied by :func:`timer` (an rtimer callback every
  100 ms, which also runs the engine's tick once a second) in batches; a batch the
  store did not take is kept by that process and sent again first.

Everything that touches Kamailio goes through the few ``_ksr_*`` functions below,
which import the ``KSR`` module (only present inside Kamailio) when first called,
so this module imports and type-checks anywhere.

One engine per Kamailio instance: :func:`start` builds it in ``mod_init``, before
Kamailio forks its workers; the store opens Redis connections per process id, so
every process that uses it gets its own.

No function here raises: every entry point catches, logs with the Call-ID and
answers. Rejections and store errors are the engine's business (the policy's
``on_store_error``); a failure of the glue itself (no engine at all) answers 500.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from policer.call import Call
from policer.compile import attribute_sources
from policer.decision import Decision
from policer.engine import Engine, NodeInUse, Prepared
from policer.policy import Policy
from policer.reconcile import ProxyDialog, parse_dialogs
from policer.reload import PolicyWatcher
from policer.store import Op, StoreError
from policer.store.keys import dialog_id, split_dialog_id

if TYPE_CHECKING:
    from policer.metrics import WorkerMetrics

__all__ = [
    "BATCH_BYTES",
    "BATCH_OPS",
    "DIALOG_EVENTS",
    "DURATION_CAP_ROUTE",
    "QUEUE",
    "NativeHandler",
    "NativeTimer",
    "Verdict",
    "admit_current",
    "build_call",
    "current_dialog_id",
    "dialog_event",
    "emergency_entries",
    "engine",
    "fallback_tables",
    "flush",
    "log",
    "manage_current",
    "probe",
    "proxy_dialogs",
    "reject_current",
    "release_current",
    "release_unknown",
    "set_engine_factory",
    "start",
    "tick",
    "timer",
]

#: The dialog module's event names, as event routes and ``event_callback`` see them.
DIALOG_EVENTS = ("dialog:start", "dialog:end", "dialog:failed")
#: The dialog module's timeout route of a call with a max duration
#: (``$dlg_ctx(timeout_route)``): a route of policer.cfg in the native flavour. In
#: KEMI the ``event_callback`` runs instead when the call reaches it, before the module
#: sends its BYEs, with the event ``dialog:timeout`` (Kamailio 5.6; its documentation
#: says with the route's name: both are taken). Either marks the end ``duration_cap``.
DURATION_CAP_ROUTE = "POLICER_DURATION_CAP"
DURATION_CAP_EVENTS = frozenset({"dialog:timeout", DURATION_CAP_ROUTE})
#: ``$dlg_var`` naming why the dialog module ended a call (set by the timeout route)
END_VAR = "$dlg_var(policer_end)"

#: The return value for app_python3: a cfg function returning 0 would stop the script.
OK = 1

#: The mqueue dialog events wait in (both flavours; policer.cfg / kemi.cfg define it).
QUEUE = "policer"
#: A batch: at most this many events, and (about) this many bytes.
BATCH_OPS = 200
BATCH_BYTES = 32768
#: Batches one flush applies at most (the rest waits for the next run, 100 ms later).
FLUSH_BATCHES = 50
#: How long a KEMI SIP worker's poll after a dialog event waits for a policy reload
#: running in the background (its tick-less process gives the reload that much time).
WORKER_RELOAD_WAIT_S = 0.05


# --------------------------------------------------------------------------- engine


def _default_factory() -> Engine:
    return Engine.from_env()


def native_engine() -> Engine:
    """The native flavour's engine: like :meth:`Engine.from_env`, but the policy file is
    watched by :class:`NativeTimer` (a reload must keep the attributes the generated
    cfg packs)."""
    return Engine.from_env(watch=False)


_factory: Callable[[], Engine] = _default_factory
_engine: Engine | None = None


def set_engine_factory(factory: Callable[[], Engine] | None = None) -> None:
    """Build the engine with ``factory`` from now on (``None``: ``Engine.from_env()``);
    forgets the current one. For tests and embedders."""
    global _factory, _engine
    _factory = factory or _default_factory
    _engine = None


def engine() -> Engine:
    """This proxy's engine, built on first use.

    One engine serves the main process and every worker forked from it: the
    store opens its Redis connections per process id, so building it before
    Kamailio forks (in :func:`start`) is fine and saves each worker the policy load.
    """
    global _engine
    if _engine is None:
        _engine = _factory()
    return _engine


def start() -> int:
    """Once per Kamailio start, before the workers fork (``mod_init``): build the
    engine, end the dialogs this node (``POLICER_NODE``) left behind in an
    earlier run and take its lease. A failure is logged and the engine is built again
    on first use; but a node name another live Kamailio holds raises
    :class:`NodeInUse` (Kamailio must not start: it would end that one's calls)."""
    global _engine
    try:
        eng = engine()
        eng.dialog_source = proxy_dialogs
        eng.start()
    except NodeInUse as e:
        log("err", f"policer: {e}")
        raise
    except Exception:
        _engine = None
        _log_exception("start", "")
    return OK


def tick() -> int:
    """About once a second from a timer process (rtimer): renew the lease, end
    dialogs of lost nodes, apply queued operations, reload a changed policy."""
    try:
        engine().tick()
    except Exception:
        _log_exception("tick", "")
    return OK


# --------------------------------------------------------------------------- KSR access

_ksr_module: Any = None


def _ksr() -> Any:
    global _ksr_module
    if _ksr_module is None:
        _ksr_module = importlib.import_module("KSR")
    return _ksr_module


def _pv(name: str) -> str:
    """A pseudo-variable's value as ``str``; ``""`` when it is null or unreadable."""
    try:
        value = _ksr().pv.get(name)
    except Exception:
        return ""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _header(name: str) -> str | None:
    """The first value of header ``name`` in the current message, or None."""
    ksr = _ksr()
    try:
        value = ksr.hdr.get(name)
    except AttributeError:  # older KEMI without KSR.hdr.get
        value = ksr.pv.get(f"$hdr({name})")
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def log(level: str, message: str) -> None:
    """Log through Kamailio (``err``, ``warn``, ``notice``, ``info``, ``dbg``)."""
    try:
        getattr(_ksr(), level)(message.rstrip("\n") + "\n")
    except Exception:
        os.write(2, f"policer: {message}\n".encode(errors="replace"))


def _log_exception(where: str, call_id: str) -> None:
    lines = traceback.format_exc().strip().splitlines()
    detail = " | ".join(line.strip() for line in lines[-3:])
    log("err", f"policer: {where} failed for Call-ID {call_id!r}: {detail}")


def _sanitize_reason(reason: str) -> str:
    return "".join(ch for ch in reason if ch >= " " and ch != "\x7f")[:128] or "Rejected"


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Verdict:
    """How to answer an initial INVITE: relay it (``admitted``) or reply ``code``."""

    admitted: bool
    code: int
    reason: str
    retry_after: int | None = None
    dialog_id: str = ""
    #: the admitted call's attributes, kept in ``$dlg_var(policer_call)`` so that
    #: ``policer reconcile`` can count the call again if Redis loses it
    call_json: str = ""
    #: seconds the admitted call may last once answered (None: no cap)
    max_duration: int | None = None

    @classmethod
    def from_decision(cls, decision: Decision, did: str, call_json: str = "") -> Verdict:
        admitted = bool(decision.admitted)
        code = 200 if admitted else int(decision.code)
        if not admitted and not 300 <= code <= 699:
            code = 503
        retry = decision.retry_after
        return cls(
            admitted=admitted,
            code=code,
            reason=_sanitize_reason(str(decision.reason or "")) if not admitted else "OK",
            retry_after=int(retry) if retry is not None and not admitted else None,
            dialog_id=did,
            call_json=call_json if admitted else "",
            max_duration=(int(decision.max_duration)
                          if admitted and decision.max_duration is not None
                          and decision.max_duration > 0 else None),
        )


#: The answer when the glue itself fails (no engine could be built at all).
def _error_verdict(did: str) -> Verdict:
    return Verdict(admitted=False, code=500, reason="Server Error", dialog_id=did)


def build_call(headers: Mapping[str, str] | None = None) -> Call:
    """A :class:`Call` from the current SIP request's pseudo-variables."""
    if headers is None:
        names = engine().policy.header_names
        headers = {}
        for name in names:
            value = _header(name)
            if value is not None:
                headers[name] = value
    return Call.from_raw(
        _pv("$ci"),
        _pv("$ft"),
        from_user=_pv("$fU"),
        from_domain=_pv("$fd"),
        ruri_user=_pv("$rU"),
        to_user=_pv("$tU"),
        source_ip=_pv("$si"),
        auth_user=_pv("$au"),
        headers=headers,
    )


def admit_current() -> Verdict:
    """Ask the engine about the current initial INVITE (one store round trip); never
    raises."""
    try:
        call = build_call()
        eng = engine()
        decision = eng.admit(call)
        if decision.fallback and eng.pending:
            _hand_off(eng)
        kept = call.to_json() if decision.admitted else ""
        return Verdict.from_decision(decision, decision.dialog_id, kept)
    except Exception:
        call_id = _pv("$ci")
        _log_exception("admit", call_id)
        return _error_verdict(_dialog_id(call_id, _pv("$ft")))


def reject_current(verdict: Verdict) -> None:
    """Answer the current request with a rejection (stateful when a transaction exists)."""
    ksr = _ksr()
    if verdict.retry_after is not None:
        ksr.hdr.append_to_reply(f"Retry-After: {verdict.retry_after}\r\n")
    ksr.sl.send_reply(verdict.code, verdict.reason)


def _dialog_timeout_s() -> int:
    """Kamailio's dialog timeout (``default_timeout``): ``POLICER_DIALOG_TIMEOUT`` as
    ``run`` passes it, else the policy's ``timeouts.dialog``."""
    try:
        return int(os.environ.get("POLICER_DIALOG_TIMEOUT") or 0) or (
            engine().policy.timeouts.dialog_s)
    except ValueError:
        return engine().policy.timeouts.dialog_s


def manage_current(verdict: Verdict) -> None:
    """Dialog tracking (``dlg_manage``) for the current, admitted initial INVITE.

    With a max duration within the dialog timeout, the dialog times out then, counted
    from the answer: the dialog module ends the call with a BYE to each side
    (``$dlg_ctx(timeout_bye)``), in-dialog requests do not push the timeout on
    (``timeout-noreset``), and its timeout route (:data:`DURATION_CAP_ROUTE`, which
    :func:`dialog_event` receives) marks the end so that it is released as
    ``duration_cap``. Without one the dialog times out as before, without BYEs."""
    ksr = _ksr()
    md = verdict.max_duration
    capped = md is not None and 0 < md <= _dialog_timeout_s()
    if capped:
        ksr.pv.seti("$dlg_ctx(timeout_bye)", 1)
        ksr.pv.sets("$dlg_ctx(timeout_route)", DURATION_CAP_ROUTE)
    ksr.dialog.dlg_manage()
    if capped:
        ksr.dialog.dlg_set_timeout(md)
        ksr.dialog.dlg_set_property("timeout-noreset")


@functools.lru_cache(maxsize=1024)
def _dialog_id(call_id: str, from_tag: str) -> str:
    # a dialog's events (start, end) arrive in the same worker more often than not
    return dialog_id(call_id, from_tag)


def current_dialog_id() -> str:
    """The dialog id of the dialog in context (``$dlg``), else of the current message."""
    call_id = _pv("$dlg(callid)") or _pv("$ci")
    from_tag = _pv("$dlg(from_tag)") or _pv("$ft")
    return _dialog_id(call_id, from_tag)


def _end_reason(event: str) -> str:
    method = _pv("$rm").upper()
    if event == "dialog:end":
        if _pv(END_VAR) == "duration_cap":  # the call reached its max duration
            return "duration_cap"
        return "bye" if method == "BYE" else "timeout"
    # dialog:failed: a final reply >= 300 to the INVITE, or a CANCEL.
    if method == "CANCEL" or _pv("$rs") == "487":
        return "cancel"
    return "failed"


# --------------------------------------------------------------------------- queued events


def _confirm_op(did: str) -> bytes:
    # no timeout: the policy's dialog timeout (the function's DIALOG_MS)
    return engine().store.pack_ops([Op("confirm", did)])


def _release_op(did: str, reason: str) -> bytes:
    return engine().store.pack_ops([Op("release", did, reason)])


def _queue(op: bytes, did: str) -> None:
    """Queue one dialog event (ops by dialog id: ASCII) for :func:`flush`. Should the
    queue refuse it, the event is applied at once rather than lost."""
    try:
        queued = _ksr().mqueue.mq_add(QUEUE, "o", op.decode("latin-1"))
    except Exception:
        queued = None
        _log_exception("queueing a dialog event", split_dialog_id(did)[0])
    if not isinstance(queued, int) or queued < 0:
        engine().apply_packed(op)


def dialog_event(event: str) -> int:
    """Queue a dialog module event (answered: confirm; ended or failed: release with
    its reason; ``dialog:timeout``: the timeout route of a call with a max duration,
    which reached it: its end is released as ``duration_cap``); never raises, never
    waits for Redis."""
    did = ""
    try:
        if event in DURATION_CAP_EVENTS:
            _ksr().pv.sets(END_VAR, "duration_cap")
            return OK
        did = current_dialog_id()
        if event == "dialog:start":
            _queue(_confirm_op(did), did)
        elif event in ("dialog:end", "dialog:failed"):
            _queue(_release_op(did, _end_reason(event)), did)
        else:
            log("dbg", f"policer: ignoring dialog event {event!r}")
        # a SIP worker has no tick: it picks up a changed policy file here (a stat at
        # most once a second), after the event is queued and never inside a decision;
        # a big policy is read in the background, given 50 ms per event (Kamailio
        # holds Python's lock between calls: the reload runs while this one waits)
        engine().poll_policy(wait=WORKER_RELOAD_WAIT_S)
    except Exception:
        _log_exception(event, split_dialog_id(did)[0])
    return OK


def release_current(reason: str = "failed") -> int:
    """Queue the release of the current request's dialog (admitted, then not relayed)."""
    call_id = _pv("$ci")
    try:
        did = _dialog_id(call_id, _pv("$ft"))
        _queue(_release_op(did, reason), did)
    except Exception:
        _log_exception("release", call_id)
    return OK


def release_unknown() -> int:
    """A BYE for a dialog this proxy does not track (another proxy set it up):
    queue its release. The caller's From-tag is the From-tag of a caller's BYE and
    the To-tag of a callee's: both are released (one names the call, the other no
    live dialog; a release is idempotent)."""
    call_id = _pv("$ci")
    try:
        did = _dialog_id(call_id, _pv("$ft"))
        _queue(_release_op(did, "bye"), did)
        to_tag = _pv("$tt")
        if to_tag:
            did = _dialog_id(call_id, to_tag)
            _queue(_release_op(did, "bye"), did)
    except Exception:
        _log_exception("release (BYE of an unknown dialog)", call_id)
    return OK


def proxy_dialogs() -> list[ProxyDialog]:
    """This Kamailio's live dialogs (``dlg.list`` through jsonrpcs, in this process):
    what :meth:`Engine.resync` puts back when Redis lost its state. Raises RuntimeError
    when the list cannot be read (the engine tries again next tick)."""
    ksr = _ksr()
    if ksr.jsonrpcs.exec('{"jsonrpc":"2.0","method":"dlg.list","id":1}') < 0:
        raise RuntimeError("jsonrpcs could not run dlg.list")
    body = ksr.pv.get("$jsonrpl(body)")
    try:
        reply = json.loads(body if isinstance(body, str) else "")
    except ValueError as e:
        raise RuntimeError(f"dlg.list: not a JSON-RPC reply ({e})") from None
    if not isinstance(reply, dict) or "result" not in reply:
        raise RuntimeError(f"dlg.list failed: {str(reply)[:200]}")
    return parse_dialogs(reply["result"])


def _hand_off(eng: Engine) -> None:
    """What this SIP worker's engine keeps for the store (a call the fallback admitted,
    to be recorded): into the timer's queue, so that it is applied as soon as the store
    answers, not at this worker's next call. Ops travel as latin-1 text (any byte but
    NUL); what cannot travel stays with the engine."""
    pack = eng.store.pack_ops
    mq = _ksr().mqueue

    def move(items: list[Any]) -> None:
        for item in items:
            op = item if isinstance(item, bytes) else pack([item])
            if mq.mq_add(QUEUE, "o", op.decode("latin-1")) < 0:
                raise RuntimeError("the queue refused an operation")

    try:
        eng.pending.drain(move, len(eng.pending), 1)
    except Exception:
        _log_exception("handing queued operations to the timer", "")
    if eng.metrics is not None:
        eng.metrics.pending(len(eng.pending), eng.pending.dropped)


def _mq_value(ksr: Any) -> str:
    mq = ksr.mqueue
    getter = getattr(mq, "mqv_get", None)
    value = getter(QUEUE) if getter is not None else ksr.pv.get(f"$mqv({QUEUE})")
    return value if isinstance(value, str) else ""


class _Held:
    """The KEMI timer's batch the store did not take (this process's own): sent again
    before anything else, while new events wait in the queue."""

    batch: bytes = b""
    ops: int = 0
    failing: bool = False


_held = _Held()


def flush(max_ops: int = BATCH_OPS, max_bytes: int = BATCH_BYTES,
          max_batches: int = FLUSH_BATCHES) -> int:
    """Apply queued dialog events in batches (one ``FCALL`` each); returns how many.

    A batch the store did not take is kept and sent again on the next run (100 ms
    later) before anything else; meanwhile new events wait in the queue (bounded: past
    its size the oldest is dropped). Never raises."""
    applied = 0
    held = _held
    try:
        eng = engine()
        ksr = _ksr()
        for _ in range(max_batches):
            if not held.ops:
                ops: list[str] = []
                size = 0
                while (len(ops) < max_ops and size < max_bytes
                       and ksr.mqueue.mq_fetch(QUEUE) > 0):
                    op = _mq_value(ksr)
                    if op:
                        ops.append(op)
                        size += len(op)
                if not ops:
                    break
                held.batch = "".join(ops).encode("latin-1")
                held.ops = len(ops)
            try:
                eng.store.apply_packed(held.batch)
            except StoreError as e:
                if eng.metrics is not None:
                    eng.metrics.store_error("batch")
                if not held.failing:
                    log("err", f"policer: store_error: a batch of {held.ops} dialog events "
                               f"was not applied ({e}); kept and sent again every 100 ms")
                held.failing = True
                break
            if held.failing:
                log("notice", "policer: dialog events applied again")
                held.failing = False
            applied += held.ops
            held.batch, held.ops = b"", 0
    except Exception:
        _log_exception("flush", "")
    return applied


_PROBE_CALL = Call.from_raw("policer-probe", "probe")


def probe(eng: Engine) -> None:
    """One dry-run decision (explain: writes nothing), timed in a timer process: what a
    decision costs from this proxy right now, with or without traffic
    (``policer_probe_seconds``). Never raises."""
    from policer.metrics import WorkerMetrics

    m = eng.metrics
    if not isinstance(m, WorkerMetrics) or eng.breaker.open:
        return
    t0 = time.perf_counter()
    try:
        eng.store.explain_call(_PROBE_CALL)
    except StoreError:
        m.store_error("probe")
        return
    except Exception:
        _log_exception("probe", "")
        return
    m.probe(time.perf_counter() - t0)


_next_tick = 0.0


def timer() -> int:
    """The KEMI flavour's rtimer callback, every 100 ms: :func:`flush`, and the
    engine's :func:`tick` once a second."""
    global _next_tick
    flush()
    now = time.monotonic()
    if now >= _next_tick:
        _next_tick = now + 1.0
        tick()
        eng = _engine
        if eng is not None:
            probe(eng)
        if eng is not None and eng.metrics is not None:
            try:
                queued = int(_ksr().mqueue.mq_size(QUEUE))
            except Exception:
                queued = 0
            eng.metrics.pending(queued + _held.ops + len(eng.pending), eng.pending.dropped)
    return OK


# --------------------------------------------------------------------------- native flavour


#: htables the native cfg's fallback reads (defined in policer.cfg)
_SETTINGS = "policer"
_CLASSES = "policer_class"
#: values in policer_class: the number (exact n:, prefix p:) or default is of the
#: emergency class (1) or of another class (2); absent: no class
_EMERGENCY, _OTHER = 1, 2


def fallback_tables(policy: Policy) -> dict[str, dict[str, int | str]]:
    """What the native cfg needs to decide without Redis, as htable contents: the
    policy's ``on_store_error`` and reject answer, and what of its classification tells
    emergency numbers from the rest with the same rule as the function (exact number,
    else longest prefix, else the default class; route POLICER_EMERGENCY).

    Only the entries that rule needs are written, each marked emergency (1) or not (2):
    an entry that gives the same answer as the entry (or default) it would fall through
    to is left out. A class of a million premium-rate prefixes beside an emergency class
    of exact numbers is then no entry at all, instead of a million htable writes by the
    timer process at every reload; the answer is the same for every number."""
    settings: dict[str, int | str] = {
        "ready": 1,
        "admit_on_error": 1 if policy.on_store_error == "admit" else 0,
        "reject_code": policy.reject.code,
        "reject_reason": policy.reject.reason,
        "reject_retry": -1 if policy.reject.retry_after is None else policy.reject.retry_after,
    }
    classes: dict[str, int | str] = {}
    emergency = policy.emergency_class
    if emergency is not None:
        classes["enabled"] = 1
        numbers, prefixes, default = emergency_entries(policy)
        for n, mark in numbers.items():
            classes[f"n:{n}"] = mark
        for p, mark in prefixes.items():
            classes[f"p:{p}"] = mark
        if default is not None:
            classes["default"] = default
        # the cfg tries prefix lengths in a while loop: within the core's max_while_loops
        classes["maxlen"] = min(max(map(len, prefixes), default=0), 100)
    return {_SETTINGS: settings, _CLASSES: classes}


def emergency_entries(policy: Policy) -> tuple[dict[str, int], dict[str, int], int | None]:
    """The exact numbers and prefixes (each marked :data:`_EMERGENCY` or :data:`_OTHER`)
    and the default class's mark that tell emergency numbers from the rest as the
    policy's classification does, without the entries that would not change an answer.

    With D the default's answer (no default: not emergency), a prefix is needed when
    its answer differs from that of its nearest shorter prefix in the policy (or D),
    and an exact number when its answer differs from that of its longest prefix (or
    D). Only entries whose answer is not D ("exceptions", usually a few emergency
    prefixes) can make another entry needed, so an entry is first looked up under the
    lengths of the exceptions alone: linear in the policy, a few lookups per entry."""
    emergency = policy.emergency_class
    mark: dict[str, int] = {}  # class name -> mark
    default: int | None = None
    prefix_mark: dict[str, int] = {}
    number_mark: dict[str, int] = {}
    for c in policy.classes:
        m = _EMERGENCY if c.name == emergency else _OTHER
        mark[c.name] = m
        prefix_mark.update(dict.fromkeys(c.prefixes, m))
        number_mark.update(dict.fromkeys(c.numbers, m))
        if c.default:
            default = m
    base = default if default is not None else _OTHER  # a number of no class: not one
    exceptions = {p for p, m in prefix_mark.items() if m != base}
    exception_lengths = sorted(set(map(len, exceptions)), reverse=True)
    all_lengths = sorted(set(map(len, prefix_mark)), reverse=True)

    def inherited(text: str, longest: int) -> int:
        """The answer of the longest prefix of ``text`` no longer than ``longest``."""
        if not any(text[:n] in exceptions for n in exception_lengths if n <= longest):
            return base  # every prefix on the way answers as the default does
        for n in all_lengths:
            if n <= longest:
                found = prefix_mark.get(text[:n])
                if found is not None:
                    return found
        return base

    if not exceptions:  # the usual case: every prefix answers as the default does
        return {n: m for n, m in number_mark.items() if m != base}, {}, default
    prefixes = {p: m for p, m in prefix_mark.items() if m != inherited(p, len(p) - 1)}
    numbers = {n: m for n, m in number_mark.items() if m != inherited(n, len(n))}
    return numbers, prefixes, default


class NativeTimer:
    """The native flavour's Python side, in Kamailio's timer process (once a second)
    and in ``mod_init``: never on a SIP worker's path.

    * the engine: :meth:`Engine.start` before the fork, :meth:`Engine.tick` (lease,
      lost-node and expiry sweeps, the library back within a second when Redis lost it);
    * the policy file (and its lists): a changed, valid policy is read, compiled and
      loaded into Redis in the background, and swapped in by a later tick (which
      renews the lease meanwhile), unless it changes the call attributes the generated
      cfg packs, which needs a restart (refused and logged, the old policy keeps
      deciding);
    * the htables the cfg's fallback reads (:func:`fallback_tables`);
    * metrics: the decisions the cfg counted (latency buckets measured by the SIP
      workers around their ``FCALL``, results, store errors, fallbacks, the event
      queue) into the ``policer_*`` metrics, and a probe: one dry-run decision timed
      here, ``policer_probe_seconds``.
    """

    def __init__(self, eng: Engine, policy_path: str | None = None) -> None:
        from policer.metrics import WorkerMetrics

        self.engine = eng
        self.metrics: WorkerMetrics | None = (
            eng.metrics if isinstance(eng.metrics, WorkerMetrics) else None)
        self.attributes = attribute_sources(eng.policy)
        path = policy_path or os.environ.get("POLICER_POLICY")
        # read, compiled and loaded in the background; swapped in by a later tick (the
        # engine's: it knows a reload is in flight and loads no library meanwhile)
        self.watcher = (PolicyWatcher(path, self._install, 1.0, on_result=self._reload_result,
                                      prepare=self._prepare, files=eng.policy.files)
                        if path else None)
        eng.watcher = self.watcher
        self._tables: dict[str, dict[str, int | str]] = {}  # what fill_tables wrote
        self._seen: dict[str, int] = {}
        self._failing = False
        self._deadline_terms: tuple[int, int] | None = None  # as last written

    # -- start and reload
    def start(self) -> None:
        self.engine.dialog_source = proxy_dialogs
        self.engine.start()
        self.fill_tables(self.engine.policy)

    def _reload(self, policy: Policy) -> None:
        """Reload now, in this thread (the watcher does the same in two halves)."""
        self._install(self._prepare(policy))

    def _prepare(self, policy: Policy) -> tuple[Prepared, dict[str, dict[str, int | str]]]:
        """The background half: refuse a policy whose call attributes differ from those
        the running cfg packs; the engine's preparation (library compiled and loaded);
        the fallback htables' new contents."""
        attributes = attribute_sources(policy)
        if attributes != self.attributes:
            raise ValueError(
                f"the new policy reads the call attributes {', '.join(attributes)} where the "
                f"running cfg packs {', '.join(self.attributes)}: restart Kamailio "
                "(deploy/kamailio/run generates the cfg again)")
        return self.engine.prepare(policy), fallback_tables(policy)

    def _install(self, prepared: tuple[Prepared, dict[str, dict[str, int | str]]]) -> None:
        """The quick half, in the timer's tick: swap the policy in, write the htable
        entries that changed."""
        ready, tables = prepared
        old = self.engine.policy
        self.engine.install(ready)
        policy = ready.policy
        self.fill_tables(policy, tables)
        if (policy.store_timeout_ms, policy.pending_queue) != (old.store_timeout_ms,
                                                                old.pending_queue):
            log("warn", "policer: store_timeout and pending_queue of the new policy apply "
                        "to the native cfg after a restart")

    def _reload_result(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reload(result)

    def fill_tables(self, policy: Policy,
                    tables: dict[str, dict[str, int | str]] | None = None) -> None:
        """Write :func:`fallback_tables` (or ``tables``, computed already) into the cfg's
        htables: the values that changed first, then the keys the old policy had and
        the new one has not are removed; and the deadline's terms (:meth:`set_deadline`)."""
        ht = _ksr().htable
        self.set_deadline()
        for table, values in (tables or fallback_tables(policy)).items():
            written = self._tables.get(table, {})
            for key, value in values.items():
                if written.get(key) == value and key in written:
                    continue
                if isinstance(value, int):
                    ht.sht_seti(table, key, value)
                else:
                    ht.sht_sets(table, key, value)
            for key in written.keys() - values.keys():
                ht.sht_rm(table, key)
            self._tables[table] = dict(values)

    def set_deadline(self) -> None:
        """What the SIP workers add to their clock for the store's (ms): ``dl_add``, the
        admit's deadline (store_timeout minus this host's measured clock skew to Redis),
        and ``now_add`` (minus the skew), which a fallback's record carries."""
        skew = round(self.engine.store.clock_skew_ms)
        terms = (self.engine.policy.store_timeout_ms - skew, -skew)
        if terms == self._deadline_terms:
            return
        ht = _ksr().htable
        ht.sht_seti(_SETTINGS, "dl_add", terms[0])
        ht.sht_seti(_SETTINGS, "now_add", terms[1])
        self._deadline_terms = terms

    # -- once a second
    def tick(self) -> None:
        self.engine.tick()  # (polls the policy watcher first)
        self.set_deadline()
        self._publish()
        probe(self.engine)

    def _counter(self, name: str) -> int:
        """How much a cfg counter grew since the last look (0 when unreadable)."""
        try:
            value = int(_ksr().pv.get(f"$stat({name})") or 0)
        except (TypeError, ValueError):
            return 0
        grown = value - self._seen.get(name, 0)
        self._seen[name] = value
        return max(0, grown)

    def _publish(self) -> None:
        from policer.adapters.kamailio_cfg import bucket_counter, sum_counter
        from policer.metrics import DECISION_RESULTS, LATENCY_BUCKETS

        m = self.metrics
        decided = 0
        for result in DECISION_RESULTS:
            buckets = [self._counter(bucket_counter(result, i))
                       for i in range(len(LATENCY_BUCKETS) + 1)]
            us = self._counter(sum_counter(result))
            if result != "store_error":
                decided += sum(buckets)
            if m is not None and (any(buckets) or us):
                m.observed(result, buckets, us / 1e6)
        admit_errors = self._counter("policer_store_error_admit")
        batch_errors = self._counter("policer_store_error_batch")
        applied = self._counter("policer_batches")
        admitted = self._counter("policer_fallback_admitted")
        rejected = self._counter("policer_fallback_rejected")
        self._counter("policer_ops")
        if admit_errors or batch_errors:
            self._failing = decided + applied == 0
        elif decided or applied:
            self._failing = False
        if m is None:
            return
        m.fallbacks(True, admitted)
        m.fallbacks(False, rejected)
        m.store_error("admit", admit_errors)
        m.store_error("batch", batch_errors)
        ksr = _ksr()
        try:
            queued = int(ksr.pv.get(f"$mq_size({QUEUE})") or 0)
            held = int(ksr.pv.get(f"$sht({_SETTINGS}=>held)") or 0)
            dropped = int(ksr.pv.get(f"$sht({_SETTINGS}=>dropped)") or 0)
        except (TypeError, ValueError):
            queued = held = dropped = 0
        m.pending(queued + held + len(self.engine.pending), dropped)
        m.breaker(self._failing or self.engine.breaker.open)

_native: NativeTimer | None = None


def native_timer() -> NativeTimer:
    global _native
    if _native is None:
        _native = NativeTimer(engine())
    return _native


def start_native() -> int:
    """``mod_init`` of the native flavour (before the fork): build the engine (its
    policy file watched by :class:`NativeTimer`), start the node, fill the htables.
    Never raises."""
    global _engine, _native
    try:
        if _factory is _default_factory:
            set_engine_factory(native_engine)
        native_timer().start()
    except NodeInUse as e:  # Kamailio must not start: it would end that one's calls
        log("err", f"policer: {e}")
        raise
    except Exception:
        _engine = None
        _native = None
        _log_exception("start", "")
    return OK


class NativeHandler:
    """The object app_python3's ``mod_init()`` returns for ``python_exec``: only the
    timer's ``python_exec("tick")`` (``route[POLICER_TICK]``, once a second). The SIP
    workers call no Python: the cfg decides and queues by itself."""

    def child_init(self, rank: int) -> int:
        return 0

    def tick(self, msg: object, args: str | None = None) -> int:
        """``python_exec("tick")`` from the rtimer route, about once a second."""
        try:
            native_timer().tick()
        except Exception:
            _log_exception("tick", "")
        return OK
