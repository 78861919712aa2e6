"""``policer reconcile``: make the shared store agree with what the proxies
really carry.

After Redis restarted empty, failed over to a replica that had not yet
received the last writes, or after a proxy lost its lease while it was only
cut off, the store and the proxies disagree. Each Kamailio proxy knows its own
dialogs (JSON-RPC ``dlg.list``). For every proxy (node):

- a dialog the proxy carries but the store does not count is **added**: it
  joins its profiles again without a limit check (it is up already), as
  admitted by that node, confirmed if the proxy has it confirmed. Its call
  attributes come from ``$dlg_var(policer_call)``, which the adapter sets on
  admission; without it, From user and To user are taken from the URIs, and
  header-valued profiles cannot be rebuilt (reported as ``partial``);
- a dialog the store counts for that node but the proxy does not know is
  **removed** (reason ``reconciled``).
"""

from __future__ import annotations

import json
import os
import select
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from policer.call import Call
from policer.log import get_logger
from policer.policy import Policy
from policer.store.base import Op, Store
from policer.store.keys import dialog_id

__all__ = ["CALL_VAR", "ProxyDialog", "Report", "fetch_dialogs", "parse_dialogs", "reconcile",
           "restore"]

#: The Kamailio dialog variable in which the adapter keeps the call's attributes.
CALL_VAR = "policer_call"
#: Ends the store decides on its own (a lost node, a deadline): a call the proxy still
#: carries is counted again.
STORE_ENDS = frozenset({"node_lost", "expired"})
#: dlg.list states: 1 unconfirmed, 2 early, 3 confirmed, 4 confirmed (ACKed), 5 deleted.
_LIVE_STATES = (1, 2, 3, 4)


@dataclass(frozen=True, slots=True)
class ProxyDialog:
    """One dialog as a proxy's ``dlg.list`` shows it."""

    call: Call
    confirmed: bool
    complete: bool  # the call's attributes were kept by the adapter

    @property
    def dialog_id(self) -> str:
        return dialog_id(self.call.call_id, self.call.from_tag)


@dataclass(slots=True)
class Report:
    node: str
    proxy_dialogs: int = 0
    kept: int = 0
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "proxy_dialogs": self.proxy_dialogs, "kept": self.kept,
                "added": self.added, "removed": self.removed, "partial": self.partial}


def _user(uri: object) -> str:
    """The user part of ``sip:user@host``; ``""`` when there is none."""
    if not isinstance(uri, str):
        return ""
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    return rest.split("@", 1)[0] if "@" in rest else ""


def _variables(raw: object) -> dict[str, str]:
    """Kamailio lists dialog variables as ``[{name: value}, ...]`` (or a mapping)."""
    out: dict[str, str] = {}
    items: Iterable[Any] = raw if isinstance(raw, list) else [raw]
    for item in items:
        if isinstance(item, Mapping):
            for k, v in item.items():
                out[str(k)] = str(v)
    return out


def parse_dialogs(result: object) -> list[ProxyDialog]:
    """The live dialogs of a ``dlg.list`` result; malformed entries are skipped."""
    out: list[ProxyDialog] = []
    for d in result if isinstance(result, list) else []:
        if not isinstance(d, Mapping) or d.get("state") not in _LIVE_STATES:
            continue
        caller = d.get("caller") if isinstance(d.get("caller"), Mapping) else {}
        call_id, tag = d.get("call-id"), caller.get("tag") if caller else None
        if not call_id or not tag:
            continue
        kept = _variables(d.get("variables")).get(CALL_VAR)
        if kept is not None:
            call = Call.from_json(call_id, tag, kept)
        else:
            to_user = _user(d.get("to_uri"))
            call = Call.from_raw(call_id, tag, from_user=_user(d.get("from_uri")),
                                 ruri_user=to_user, to_user=to_user)
        out.append(ProxyDialog(call, d.get("state") in (3, 4), kept is not None))
    return out


def fetch_dialogs(address: str, timeout: float = 5.0) -> list[ProxyDialog]:
    """Ask a Kamailio proxy for its dialogs (``dlg.list``) over JSON-RPC.

    ``address`` is ``fifo:/path/kamailio_rpc.fifo`` (``jsonrpcs`` ``fifo_name``;
    replies of any size, the form to use for busy proxies) or
    ``unix:/path/kamailio_rpc.sock`` (``dgram_socket``; a reply must fit in one
    datagram, about 64 KB: some 80 dialogs). Raises OSError or ValueError with a
    clear message."""
    request = {"jsonrpc": "2.0", "method": "dlg.list", "id": 1}
    if address.startswith("fifo:"):
        data = _fifo_call(address[5:], request, timeout)
    else:
        data = _dgram_call(address[5:] if address.startswith("unix:") else address,
                           request, timeout)
    try:
        reply = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{address}: not a JSON-RPC reply ({e})") from None
    if not isinstance(reply, dict):
        raise ValueError(f"{address}: not a JSON-RPC reply")
    if "error" in reply:
        raise ValueError(f"{address}: dlg.list failed: {reply['error']}")
    return parse_dialogs(reply.get("result"))


def _dgram_call(path: str, request: dict[str, Any], timeout: float) -> bytes:
    reply_path = os.path.join(tempfile.gettempdir(), f"policer-rpc-{uuid.uuid4().hex}.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(reply_path)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.settimeout(timeout)
            s.sendto(json.dumps(request).encode(), path)
            return s.recv(16 << 20)
        finally:
            os.unlink(reply_path)


def _fifo_call(path: str, request: dict[str, Any], timeout: float) -> bytes:
    """jsonrpcs' FIFO transport: the reply is written to a FIFO named in the
    request, which Kamailio opens in its ``fifo_reply_dir`` (the directory of
    the proxy's FIFO, as deploy/kamailio/run sets it)."""
    name = f"policer-reply-{uuid.uuid4().hex}"
    reply_path = os.path.join(os.path.dirname(path), name)
    os.mkfifo(reply_path, 0o600)
    try:
        # open our end first: Kamailio's open for writing fails while nobody reads
        rfd = os.open(reply_path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: no Kamailio reads
            try:
                os.write(fd, (json.dumps({**request, "reply_name": name}) + "\n").encode())
            finally:
                os.close(fd)
        except OSError:
            os.close(rfd)
            raise
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        writer_seen = False
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no reply on {reply_path} within {timeout}s")
                ready, _, _ = select.select([rfd], [], [], left)
                if not ready:
                    continue
                chunk = os.read(rfd, 1 << 20)
                if chunk:
                    chunks.append(chunk)
                    writer_seen = True
                elif writer_seen:
                    break  # Kamailio wrote the reply and closed its end
                else:
                    time.sleep(0.01)  # not opened for writing yet
        finally:
            os.close(rfd)
        return b"".join(chunks)
    finally:
        os.unlink(reply_path)


def reconcile(policy: Policy, store: Store, node: str, dialogs: Iterable[ProxyDialog],
              dry_run: bool = False, listed_at_ms: int | None = None) -> Report:
    """Bring the store in line with one node's dialogs (see the module doc).

    ``listed_at_ms`` (the store's clock, taken just before the proxy was asked)
    protects calls that moved on while the list was taken: a dialog admitted
    after it is not removed, and one that ended meanwhile is not added again."""
    report = Report(node)
    theirs = {d.dialog_id: d for d in dialogs}
    report.proxy_dialogs = len(theirs)
    ours = set(store.node_dialogs(node))
    for did, d in theirs.items():
        info = store.dialog(did)
        if info is not None and info.state in ("early", "confirmed"):
            report.kept += 1
            continue
        if info is not None and info.state == "ended" \
                and info.end_reason not in STORE_ENDS:
            continue  # it ended after the proxy listed it (not ended by the store itself)
        report.added.append(did)
        if not d.complete:
            report.partial.append(did)
        if not dry_run:
            restore(policy, store, d.call, node, d.confirmed)
    for did in sorted(ours - set(theirs)):
        info = store.dialog(did)
        if info is None or info.state not in ("early", "confirmed"):
            continue
        if listed_at_ms is not None and info.init_ms >= listed_at_ms:
            continue  # admitted after the proxy listed its dialogs
        report.removed.append(did)
        if not dry_run:
            store.release(did, "reconciled")
    get_logger("policer.reconcile").info(
        "reconciled", reconcile_node=node, proxy_dialogs=report.proxy_dialogs,
        kept=report.kept, added=len(report.added), removed=len(report.removed),
        partial=len(report.partial), dry_run=dry_run)
    return report


def restore(policy: Policy, store: Store, call: Call, node: str, confirmed: bool) -> bool:
    """Count a call a proxy still carries but the store lost: it joins its profiles
    without a limit check, as admitted by ``node`` (answered: until the policy's dialog
    timeout). Returns False when the store already had it. Raises StoreError."""
    did = dialog_id(call.call_id, call.from_tag)
    ops = [Op("record", did, call=call, node=node)]
    if confirmed:
        ops.append(Op("confirm", did, policy.timeouts.dialog_ms))
    return bool(store.apply(ops)[0])
