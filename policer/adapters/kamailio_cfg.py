"""The policy-specific part of the native Kamailio flavour, generated from the policy.

``deploy/kamailio/policer.cfg`` calls the policy's admit function through
``ndb_redis`` with the call's attributes packed in the function's format
(``<byte length>:<bytes>`` each, in :attr:`policer.compile.Library.attributes`
order). Which attributes, in which order, depends on the policy, and so do the
Redis connection, the queue bound and the ``ndb_redis`` time bounds: this module
writes that piece of cfg (``policer-generated.cfg``, which ``policer.cfg``
includes) and the defines ``policer.cfg`` needs (``deploy/kamailio/run`` passes
them with ``-A``)::

    python -m policer.adapters.kamailio_cfg --policy POLICY --node NODE \\
        --redis redis://127.0.0.1:6379/0 --out /run/policer/policer-generated.cfg

prints the defines, one ``NAME=VALUE`` a line (``--defines`` writes them into
the file as ``#!define`` lines instead, for a cfg started without ``run``).

The generated file holds:

* ``modparam`` lines: the ``ndb_redis`` server ``policer`` (from the store URL;
  the file is written mode 0600 because it may hold a password) and its time
  bounds derived from the policy's ``store_timeout`` (:func:`ndb_timeouts`), the
  ``mqueue`` of dialog events (bounded by the policy's ``pending_queue``), and the
  ``counters`` the cfg counts decisions and latencies in;
* ``route[POLICER_ATTRS]``: ``$var(policer_attrs)``, the packed attributes; a
  null pseudo-variable (absent header, R-URI without user) packs as ``0:``
  (printed, a null PV would read ``<null>``);
* ``route[POLICER_NUMBER]``: ``$var(policer_number)``, the dialled number (for
  the emergency check when Redis does not answer);
* ``route[POLICER_KEEP]``: ``$dlg_var(policer_call)``, the attributes kept with
  Kamailio's dialog for ``policer reconcile`` (:func:`kept_value`;
  :meth:`policer.call.Call.from_json` reads it back);
* ``route[POLICER_OBSERVE]``: the decision's latency, measured by the SIP worker
  around the ``FCALL``, into per-process counters (bucket bounds of
  ``policer_decision_seconds``); the timer process turns them into that metric.

A policy reload that changes the attributes needs a Kamailio restart (the timer
process refuses it, see :mod:`policer.adapters.kamailio`); everything else the
cfg reads from the policy at run time comes from htables the timer process fills.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from policer.call import KEPT_ATTRIBUTES_PREFIX, pack_fields, raw_bytes
from policer.compile import compile_policy
from policer.log import redact
from policer.metrics import DECISION_RESULTS, LATENCY_BUCKETS
from policer.policy import Policy, load_policy
from policer.protocol import EGRESS_REPLY, NATIVE_REPLY
from policer.store.keys import key_part

__all__ = [
    "GENERATED_NAME",
    "KEPT_PREFIX",
    "QUEUE",
    "GeneratedCfg",
    "NdbTimeouts",
    "bucket_counter",
    "generate",
    "kept_value",
    "ndb_server",
    "ndb_timeouts",
    "number_route",
    "reply_var",
    "sum_counter",
]

#: The file name ``policer.cfg`` includes (relative: Kamailio looks in its working
#: directory first, then beside policer.cfg; ``run`` starts Kamailio in its runtime dir).
GENERATED_NAME = "policer-generated.cfg"
#: The mqueue the cfg queues dialog events in (and the KEMI flavour too).
QUEUE = "policer"
#: How ``$dlg_var(policer_call)`` starts when the native cfg wrote it:
#: ``policer-attrs;<source>,<source>...;<base64 of the packed attributes>``.
KEPT_PREFIX = KEPT_ATTRIBUTES_PREFIX

#: Attribute sources and the pseudo-variable the cfg reads each from.
_PV = {
    "from_user": "$fU",
    "from_domain": "$fd",
    "ruri_user": "$rU",
    "to_user": "$tU",
    "source_ip": "$si",
    "auth_user": "$au",
    # where the call is sent: $du's host:port (route(POLICER_GATEWAY_OF)), set before
    # the admit (a dispatcher chose $du already: the admit decides that first attempt)
    # and again by route(POLICER_EGRESS) for each further attempt
    "gateway": "$avp(policer_gw)",
}
#: The admit's deadline as ndb_redis expands it into the command (ARGV 9 and 10 of the
#: admit function): the SIP worker's clock when it sent the command (``$TV(Sn)``, taken
#: into ``$var(policer_sent)`` by route POLICER) and the ms to add to it, which the timer
#: process keeps in ``$sht(policer=>dl_add)`` (store_timeout minus the measured skew of
#: this host's clock to Redis's) and route POLICER copies into ``$var(policer_dla)`` (the
#: same value is then in the command and in a fallback's settlement).
_DEADLINE_PVS = "$var(policer_sent) $var(policer_dla)"
#: Header names the cfg can name inside ``$hdr(...)`` without quoting trouble.
_SAFE_HEADER = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True, slots=True)
class NdbTimeouts:
    """``ndb_redis`` bounds (ms, ms, count, s)."""

    cmd_timeout: int
    connect_timeout: int
    allowed_timeouts: int
    disable_time: int


def ndb_timeouts(store_timeout_ms: int) -> NdbTimeouts:
    """ndb_redis bounds from the policy's ``store_timeout``.

    After a failed command ndb_redis reconnects (``connect_timeout``, then a PING
    bounded by ``cmd_timeout``) and sends the command once more: with each bound
    half of ``store_timeout``, a frozen Redis (connect succeeds, nothing answers)
    and an unreachable one (connect hangs) both cost a SIP worker about
    ``store_timeout``. ``allowed_timeouts`` 0 and ``disable_time`` 1 s make that
    worker's next calls skip Redis for a second (the fallback decides at once)
    before it tries again: a circuit breaker per process."""
    half = max(1, store_timeout_ms // 2)
    return NdbTimeouts(cmd_timeout=half, connect_timeout=half, allowed_timeouts=0,
                       disable_time=1)


def ndb_server(url: str, name: str = "policer") -> str:
    """The ``ndb_redis`` ``server`` modparam for a store URL (``redis://`` and
    ``unix://`` only: ndb_redis 5.6 speaks neither TLS, Sentinel nor ACL users).
    Raises ValueError."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = parse_qs(parts.query)
    attrs = [f"name={name}"]
    if scheme == "redis":
        host = parts.hostname or "127.0.0.1"
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"{redact(url)}: bad port") from None
        attrs += [f"addr={host}", f"port={port}"]
        path = parts.path.strip("/")
        db = path or query.get("db", ["0"])[0]
    elif scheme == "unix":
        if not parts.path:
            raise ValueError(f"{redact(url)}: no socket path")
        attrs.append(f"unix={unquote(parts.path)}")
        db = query.get("db", ["0"])[0]
    else:
        raise ValueError(
            f"{redact(url)}: the native flavour's ndb_redis reaches one Redis only "
            "(redis:// or unix://); use the kemi flavour for rediss://, "
            "redis+sentinel:// or redis+cluster://")
    if not db.isdigit():
        raise ValueError(f"{redact(url)}: database must be a number")
    attrs.append(f"db={int(db)}")
    user = unquote(parts.username) if parts.username else ""
    password = unquote(parts.password) if parts.password is not None else ""
    if parts.password is None and user:  # redis://secret@host: a password alone
        user, password = "", user
    if user and user != "default":
        raise ValueError(f"{redact(url)}: ndb_redis 5.6 authenticates with a password "
                         "only (AUTH password): no ACL user")
    if password:
        if any(c in password for c in ';"\\\n\r') or not password.isprintable():
            raise ValueError(f"{redact(url)}: this password cannot be written into "
                             "an ndb_redis server parameter")
        attrs.append(f"pass={password}")
    for value in attrs:
        if any(c in value for c in '";\n\r'):
            raise ValueError(f"{redact(url)}: unusable characters for ndb_redis")
    return ";".join(attrs)


def bucket_counter(result: str, index: int) -> str:
    """The cfg counter of one latency bucket (``len(LATENCY_BUCKETS)`` = +Inf)."""
    return f"policer_{result}_{index}"


def sum_counter(result: str) -> str:
    """The cfg counter summing latencies (microseconds) of one result."""
    return f"policer_{result}_us"


#: Other counters the cfg keeps (name -> what), read by the timer process.
CFG_COUNTERS = {
    "policer_store_error_admit": "admits Redis did not answer (error, timeout, no function)",
    "policer_store_error_batch": "dialog-event batches Redis did not apply (kept, retried)",
    "policer_store_error_egress": "gateway attempts Redis did not answer (on_store_error)",
    "policer_fallback_admitted": "calls admitted by on_store_error or as emergency calls",
    "policer_fallback_rejected": "calls rejected by on_store_error",
    "policer_batches": "dialog-event batches applied",
    "policer_ops": "dialog events applied",
}


def _cfg_str(value: str) -> str:
    """A Kamailio cfg string literal."""
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"cannot write {value!r} into the cfg")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: Pseudo-variables a parsed request always has: the source address, the From
#: domain (a request whose From does not parse never gets this far)
_NEVER_NULL = frozenset({"$si", "$fd"})


def _pv_of(source: str) -> str:
    if source.startswith("header:"):
        name = source[7:]
        if not _SAFE_HEADER.match(name):
            raise ValueError(f"header {name!r}: the native cfg reads headers named with "
                             "letters, digits, '-', '_' and '.' only (use the kemi flavour)")
        return f"$hdr({name})"
    try:
        return _PV[source]
    except KeyError:
        raise ValueError(f"no pseudo-variable for attribute source {source!r}") from None


@dataclass(frozen=True, slots=True)
class GeneratedCfg:
    """The generated include file and the defines policer.cfg needs."""

    text: str
    defines: Mapping[str, str]  # name -> cfg token (a quoted string or a number)
    attributes: tuple[str, ...]

    def define_lines(self) -> list[str]:
        """``NAME=VALUE`` for ``kamailio -A``."""
        return [f"{k}={v}" for k, v in self.defines.items()]


def kept_value(sources: Sequence[str], packed: bytes) -> str:
    """What the cfg keeps in ``$dlg_var(policer_call)`` (for tests and tools)."""
    return KEPT_PREFIX + ",".join(sources) + ";" + base64.b64encode(packed).decode()


def _observe_route() -> list[str]:
    """route[POLICER_OBSERVE]: $var(policer_us) into the counters of
    $var(policer_result) (an index into DECISION_RESULTS)."""
    bounds = [round(b * 1_000_000) for b in LATENCY_BUCKETS]

    def tree(result: str, lo: int, hi: int, indent: str) -> list[str]:
        # buckets lo..hi (hi == len(bounds): +Inf)
        if lo == hi:
            return [f'{indent}cnt_inc("{bucket_counter(result, lo)}");']
        mid = (lo + hi) // 2
        out = [f"{indent}if ($var(policer_us) <= {bounds[mid]}) {{"]
        out += tree(result, lo, mid, indent + "\t")
        out.append(f"{indent}}} else {{")
        out += tree(result, mid + 1, hi, indent + "\t")
        out.append(f"{indent}}}")
        return out

    lines = [
        "# the decision's latency (SIP worker, around the FCALL) into this process's",
        "# counters; the timer process publishes them as policer_decision_seconds",
        "route[POLICER_OBSERVE] {",
        "\t$var(policer_t1s) = $TV(sn);",
        "\t$var(policer_us) = ($var(policer_t1s) - $var(policer_t0s)) * 1000000"
        " + $TV(un) - $var(policer_t0u);",
    ]
    for i, result in enumerate(DECISION_RESULTS):
        kw = "if" if i == 0 else "} else if"
        lines.append(f"\t{kw} ($var(policer_result) == {i}) {{")
        lines.append(f'\t\tcnt_add("{sum_counter(result)}", "$var(policer_us)");')
        lines += tree(result, 0, len(bounds), "\t\t")
    lines += ["\t}", "}"]
    return lines


def generate(policy: Policy, node: str, redis_url: str, *,
             with_defines: bool = False) -> GeneratedCfg:
    """The include file and defines for one proxy (``node``) under ``policy``."""
    library = compile_policy(policy)
    sources = library.attributes
    pvs = [_pv_of(s) for s in sources]
    server = ndb_server(redis_url)
    t = ndb_timeouts(policy.store_timeout_ms)
    node_key = key_part(node)
    defines = {
        # hiredis formats the command: a literal '%' (an encoded node) is written '%%'
        "POLICER_ADMIT_CMD": _cfg_str(
            f"FCALL {library.function('admit')} 1 {library.prefix} "
            f"{node_key.replace('%', '%%')} %s %s %s A 0 {library.attributes_sig} - "
            f"{_DEADLINE_PVS}"),
        # mode A: the node holds a lease (its tick registers it), the reply is what the
        # cfg reads; the signature: a library of another policy refuses, the cfg falls
        # back; '-': no explain instant; then the deadline, expanded by ndb_redis when it
        # formats the command: the worker's clock when it sent it and the ms to add (the
        # timer's measured skew to Redis's clock, and store_timeout)
        "POLICER_CMD_TIMEOUT_US": str(t.cmd_timeout * 1000),
        "POLICER_BATCH_CMD": _cfg_str(f"FCALL {library.function('batch')} 1 "
                                      f"{library.prefix} %s 0 0 {library.attributes_sig}"),
        # the node as the batch function's 'a' op carries it (raw: the function encodes it)
        "POLICER_NODE_FIELD": _cfg_str(pack_fields([node]).decode("utf-8", "surrogateescape")),
        "POLICER_QUEUE_SIZE": str(max(1, policy.pending_queue)),
        # one attempt to send an admitted dialog to a gateway: its id, the gateway, the
        # clock offset (0) and the deadline, as the admit's
        "POLICER_EGRESS_CMD": _cfg_str(f"FCALL {library.function('egress')} 1 "
                                       f"{library.prefix} %s %s 0 {_DEADLINE_PVS}"),
    }
    if "gateway" in sources:
        # route(POLICER_EGRESS) asks Redis only when the policy has a gateway profile
        defines["POLICER_WITH_EGRESS"] = "1"
    for name in ("POLICER_ADMIT_CMD", "POLICER_BATCH_CMD", "POLICER_EGRESS_CMD"):
        # never: key_part and namespaces leave no '$' (only the deadline's own variables)
        if "$" in defines[name].replace(_DEADLINE_PVS, ""):
            raise ValueError(f"{name} would hold a '$'")

    out = [
        f"# generated by policer.adapters.kamailio_cfg for node {node!r} from",
        f"# {policy.source} (policy hash {library.policy_hash}): do not edit, regenerate.",
        f"# Attributes ARGV[4] of {library.function('admit')} carries, in order:",
        f"#   {', '.join(sources)}",
        "",
    ]
    if with_defines:
        out += [f"#!define {k} {v}" for k, v in defines.items()] + [""]
    out += [
        f"modparam(\"ndb_redis\", \"server\", {_cfg_str(server)})",
        f"# store_timeout {policy.store_timeout_ms} ms: each bound half of it (a retry after",
        "# a reconnect stays within it); after a failure this process skips Redis 1 s",
        f"modparam(\"ndb_redis\", \"cmd_timeout\", {t.cmd_timeout})",
        f"modparam(\"ndb_redis\", \"connect_timeout\", {t.connect_timeout})",
        f"modparam(\"ndb_redis\", \"allowed_timeouts\", {t.allowed_timeouts})",
        f"modparam(\"ndb_redis\", \"disable_time\", {t.disable_time})",
        "# dialog events waiting for the next batch (pending_queue bounds it: past it the",
        "# oldest event is dropped and counted in $sht(policer=>dropped))",
        f"modparam(\"mqueue\", \"mqueue\", \"name={QUEUE};size={max(1, policy.pending_queue)}\")",
    ]
    for name, what in CFG_COUNTERS.items():
        if ":" in what or "." in name:
            raise ValueError(f"counter {name}: no ':' in a description, no '.' in a name")
        out.append(f'modparam("counters", "script_counter", "{name} {what}")')
    for result in DECISION_RESULTS:
        out.append(f'modparam("counters", "script_counter", "{sum_counter(result)} '
                   f'{result} decisions - latency sum in microseconds")')
        for i in range(len(LATENCY_BUCKETS) + 1):
            out.append(f'modparam("counters", "script_counter", "{bucket_counter(result, i)} '
                       f'{result} decisions in latency bucket {i}")')
    out += ["", "# the call's attributes for the admit function, packed",
            "route[POLICER_ATTRS] {", '\t$var(policer_attrs) = "";']
    for source, pv in zip(sources, pvs, strict=True):
        if pv in _NEVER_NULL:  # one action fewer per call
            out += [f"\t# {source}",
                    f"\t$var(policer_attrs) = $var(policer_attrs)"
                    f' + $({pv[1:]}{{s.len}}) + ":" + {pv};']
            continue
        out += [
            f"\t# {source}",
            f"\tif ({pv} == $null) {{",
            '\t\t$var(policer_attrs) = $var(policer_attrs) + "0:";',
            "\t} else {",
            f'\t\t$var(policer_attrs) = $var(policer_attrs) + $({pv[1:]}{{s.len}}) + ":" + {pv};',
            "\t}",
        ]
    out += [
        "}",
        "",
        "# the dialled number (the emergency check when Redis does not answer)",
        *number_route("POLICER_NUMBER", pvs[0]),
        "",
        *_reply_route(),
        "",
        *_egress_reply_route(),
        "",
        "# the call's attributes, kept with Kamailio's dialog for `policer reconcile`",
        "route[POLICER_KEEP] {",
        f"\t$dlg_var(policer_call) = {_cfg_str(KEPT_PREFIX + ','.join(sources) + ';')}"
        " + $(var(policer_attrs){s.encode.base64});",
        "}",
        "",
        *_observe_route(),
        "",
    ]
    return GeneratedCfg("\n".join(out), defines, tuple(sources))


#: The reply fields route[POLICER_REPLY] reads into ``$var(policer_<name>)``: those of
#: an admitted call, of a rejected one, and those only the latency counters need.
REPLY_VARS: dict[str, tuple[str, ...]] = {
    "admitted": ("max_duration_s", "dialog_id"),
    "gateway": ("egress",),  # only when the policy has a gateway profile
    "rejected": ("code", "reason", "retry_after"),
    "latency": ("bypass", "shadow"),
}
_REPLY_VAR = {"max_duration_s": "md", "dialog_id": "did", "retry_after": "retry_after"}


def number_route(name: str, pv: str) -> list[str]:
    """``route[name]``: the dialled number (pseudo-variable ``pv``) into
    ``$var(policer_number)``, '' when the message has none (the native and the http
    flavours' cfg both write it so)."""
    return [f"route[{name}] {{",
            f"\tif ({pv} == $null) {{",
            '\t\t$var(policer_number) = "";',
            "\t} else {",
            f"\t\t$var(policer_number) = {pv};",
            "\t}",
            "}"]


def reply_var(field: str) -> str:
    """The ``$var`` route[POLICER_REPLY] reads a NATIVE_REPLY field into."""
    return f"$var(policer_{_REPLY_VAR.get(field, field)})"


def _reply_route() -> list[str]:
    """route[POLICER_REPLY]: the admit's reply (NATIVE_REPLY, positions from the protocol's
    table) into ``$var`` s."""
    def read(field: str) -> str:
        return f"{reply_var(field)} = $redis(policer_admit=>value[{NATIVE_REPLY.index(field)}]);"

    out = ["# the admit's reply (policer.protocol NATIVE_REPLY) into $var(policer_...)",
           "route[POLICER_REPLY] {", "\t" + read("admitted"),
           f"\tif ({reply_var('admitted')} == 1) {{"]
    out += ["\t\t" + read(f) for f in REPLY_VARS["admitted"]]
    # admitted, its gateway ($du) full: the gateway limit's answer, for when no other
    # gateway has room (route(POLICER) set $var(policer_egress) to -1, not decided)
    out += ["#!ifdef POLICER_WITH_EGRESS"] + ["\t\t" + read(f) for f in REPLY_VARS["gateway"]]
    out += [f"\t\tif ({reply_var('egress')} == 0) {{"]
    out += ["\t\t\t" + read(f) for f in REPLY_VARS["rejected"]] + ["\t\t}", "#!endif"]
    out += ["\t} else {"] + ["\t\t" + read(f) for f in REPLY_VARS["rejected"]] + ["\t}"]
    out += ["#!ifdef POLICER_WORKER_LATENCY"] + ["\t" + read(f) for f in REPLY_VARS["latency"]]
    out += ["#!endif", "}"]
    return out


def _egress_reply_route() -> list[str]:
    """route[POLICER_EGRESS_REPLY]: the egress reply (EGRESS_REPLY) into
    ``$var(policer_egress)`` (1 taken, 0 full) and, full, ``$var(policer_code)``,
    ``$var(policer_reason)``, ``$var(policer_retry_after)``."""
    def read(var: str, field: str) -> str:
        return f"$var({var}) = $redis(policer_egress=>value[{EGRESS_REPLY.index(field)}]);"

    return ["# the egress reply (policer.protocol EGRESS_REPLY) into $var(policer_...)",
            "route[POLICER_EGRESS_REPLY] {", "	" + read("policer_egress", "taken"),
            "	if ($var(policer_egress) != 1) {",
            "		" + read("policer_code", "code"), "		" + read("policer_reason", "reason"),
            "		" + read("policer_retry_after", "retry_after"), "	}", "}"]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m policer.adapters.kamailio_cfg",
        description="Write the policy-specific include file of deploy/kamailio/policer.cfg "
                    "and print its defines (NAME=VALUE, one a line, for kamailio -A).")
    ap.add_argument("--policy", required=True, help="policy file")
    ap.add_argument("--node", required=True, help="this proxy's node name (POLICER_NODE)")
    ap.add_argument("--redis", required=True, help="store URL (redis:// or unix://)")
    ap.add_argument("--out", required=True, help=f"the file to write (policer.cfg includes "
                                                 f"{GENERATED_NAME!r})")
    ap.add_argument("--defines", action="store_true",
                    help="write the defines into the file as #!define lines too")
    args = ap.parse_args(argv)
    try:
        policy = load_policy(args.policy)
        gen = generate(policy, args.node, args.redis, with_defines=args.defines)
    except ValueError as e:  # PolicyError is a ValueError
        print(f"kamailio_cfg: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write(gen.text)
    os.replace(tmp, out)
    for line in gen.define_lines():
        sys.stdout.write(raw_bytes(line).decode("utf-8", "replace") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
