"""The queue of dialog events in Kamailio's ``mqueue`` (the KEMI flavour's; the native
cfg queues in the same one by itself): events are queued by the SIP workers, each op
packed in the batch function's format, and applied by the timer's :func:`flush` in
batches, one ``FCALL`` each. A batch the store did not take is kept by the timer
process and sent again first.
"""

from __future__ import annotations

from typing import Any

from policer.adapters.kamailio_engine import engine
from policer.adapters.kamailio_ksr import ksr, log, log_exception
from policer.engine import Engine
from policer.store import StoreError
from policer.store.keys import split_dialog_id

__all__ = ["BATCH_BYTES", "BATCH_OPS", "FLUSH_BATCHES", "QUEUE", "flush", "hand_off",
           "queue_op", "waiting"]

#: The mqueue dialog events wait in (both flavours; policer.cfg / kemi.cfg define it).
QUEUE = "policer"
#: A batch: at most this many events, and (about) this many bytes.
BATCH_OPS = 200
BATCH_BYTES = 32768
#: Batches one flush applies at most (the rest waits for the next run, 100 ms later).
FLUSH_BATCHES = 50


def queue_op(op: bytes, did: str) -> None:
    """Queue one dialog event (ops by dialog id: ASCII) for :func:`flush`. Should the
    queue refuse it, the event is applied at once rather than lost."""
    try:
        queued = ksr().mqueue.mq_add(QUEUE, "o", op.decode("latin-1"))
    except Exception:
        queued = None
        log_exception("queueing a dialog event", split_dialog_id(did)[0])
    if not isinstance(queued, int) or queued < 0:
        engine().apply_packed(op)


def hand_off(eng: Engine) -> None:
    """What this SIP worker's engine keeps for the store (a call the fallback admitted,
    to be recorded): into the timer's queue, so that it is applied as soon as the store
    answers, not at this worker's next call. Ops travel as latin-1 text (any byte but
    NUL); what cannot travel stays with the engine."""
    mq = ksr().mqueue

    def put(op: bytes) -> None:
        if mq.mq_add(QUEUE, "o", op.decode("latin-1")) < 0:
            raise RuntimeError("the queue refused an operation")

    try:
        eng.hand_off(put)
    except Exception:
        log_exception("handing queued operations to the timer", "")


def _mq_value(k: Any) -> str:
    mq = k.mqueue
    getter = getattr(mq, "mqv_get", None)
    value = getter(QUEUE) if getter is not None else k.pv.get(f"$mqv({QUEUE})")
    return value if isinstance(value, str) else ""


class _Held:
    """The KEMI timer's batch the store did not take (this process's own): sent again
    before anything else, while new events wait in the queue."""

    batch: bytes = b""
    ops: int = 0
    failing: bool = False


_held = _Held()


def waiting() -> int:
    """Dialog events not applied yet: in the queue, and in the batch kept for a retry."""
    try:
        queued = int(ksr().mqueue.mq_size(QUEUE))
    except Exception:
        queued = 0
    return queued + _held.ops


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
        k = ksr()
        for _ in range(max_batches):
            if not held.ops:
                ops: list[str] = []
                size = 0
                while (len(ops) < max_ops and size < max_bytes
                       and k.mqueue.mq_fetch(QUEUE) > 0):
                    op = _mq_value(k)
                    if op:
                        ops.append(op)
                        size += len(op)
                if not ops:
                    break
                held.batch = "".join(ops).encode("latin-1")
                held.ops = len(ops)
            try:
                eng.apply_batch(held.batch)
            except StoreError as e:
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
        log_exception("flush", "")
    return applied
