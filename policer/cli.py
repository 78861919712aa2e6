"""The ``policer`` command line.

Every command reads ``--redis URL`` (or ``POLICER_REDIS_URL``) and
``--policy FILE`` (or ``POLICER_POLICY``); ``--json`` gives machine output.
Exit status: 0 success (for ``admit``: admitted), 1 rejected / not found,
2 usage or policy error, 3 the store could not be reached (for ``reconcile``: also a
proxy whose dialogs could not be listed).

Values from SIP (and every string of ``--json``) are printed in the form
:func:`policer.printable.printable` gives: a byte that is not UTF-8 as ``\\xff``, a
control character as ``\\x1b``, a backslash as ``\\\\``; no terminal control
sequence reaches the terminal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from policer import fraud_admin, live_limits, parents
from policer.call import Call
from policer.compile import compile_policy
from policer.decision import Decision
from policer.log import configure, redact
from policer.policy import Policy, PolicyError, Rate, load_policy, parse_duration_ms
from policer.printable import printable, printable_data
from policer.store import Store, StoreError, open_store
from policer.store.base import CallRecord, DialogInfo, ExplainRow
from policer.store.fraud import FraudEvent
from policer.store.keys import dialog_id, is_dialog_id

if TYPE_CHECKING:  # the engine (and prometheus-client) is imported when a command needs
    # it: `policer serve --workers N` must set PROMETHEUS_MULTIPROC_DIR first
    from policer.engine import Engine

__all__ = ["main"]

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_POLICY = "policies/example.yaml"

EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_STORE = 0, 1, 2, 3

#: The ranges of the numbers the command line stores or sends (docs/security.md,
#: "Command-line ranges"). A live limit may hold what a policy file may (the policy
#: reader's bounds, policer/policy/sections.py); the others are bounds of sense.
MAX_CONCURRENT = 10_000_000  # limits set PROFILE VALUE MAX: a limit's max
MAX_RATE = 1_000_000  # --rate N/PER: N, and --burst
MAX_RATE_PER_MS = 86_400_000  # --rate N/PER: PER, 1ms to 1d
MAX_WINDOW_CALLS = 1_000_000_000  # --calls N/WINDOW: N
MAX_ROWS = 1_000  # --top of top, exporter and replay
MAX_WORKERS = 1_024  # serve --workers
MAX_SECONDS = 3_600.0  # --interval of top and cdr tail -f, --timeout of reconcile
MAX_EPOCH_MS = 2**63 - 1  # replay --since/--until, explain --at: a signed 64-bit integer

_DIGITS = re.compile(r"-?[0-9]{1,30}")


def _whole(text: str, lo: int, hi: int | None = None) -> int:
    """A whole number (ASCII digits, a leading minus allowed) from ``lo`` to ``hi``;
    ValueError saying what is expected."""
    expected = f"a whole number from {lo} to {hi}" if hi is not None else \
        f"a whole number >= {lo}"
    t = text.strip()
    if not _DIGITS.fullmatch(t):
        if re.fullmatch(r"-?[0-9]+", t):
            raise ValueError(f"{text.strip()[:24]}...: out of range (expected {expected})")
        raise ValueError(f"{text!r}: expected {expected}")
    n = int(t)
    if n < lo or (hi is not None and n > hi):
        raise ValueError(f"{n}: out of range (expected {expected})")
    return n


def _whole_type(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: :func:`_whole` (out of range: argparse's usage error, exit 2)."""
    def whole(text: str) -> int:
        try:
            return _whole(text, lo, hi)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return whole


def _seconds_type(lo: float, hi: float = MAX_SECONDS) -> Callable[[str], float]:
    """An argparse type: a number of seconds from ``lo`` to ``hi`` (no nan, no inf)."""
    def seconds(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and lo <= x <= hi):
            raise argparse.ArgumentTypeError(f"{text!r}: expected seconds from {lo:g} to {hi:g}")
        return x
    return seconds


def _epoch_ms(ms: int, what: str, text: str) -> int:
    """A time in Unix ms inside what the store can hold (1970 to a signed 64-bit ms)."""
    if not 0 <= ms <= MAX_EPOCH_MS:
        raise CliError(f"{what} {text!r}: out of range (1970-01-01 to {MAX_EPOCH_MS} ms)")
    return ms


class CliError(Exception):
    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- helpers


def _common(p: argparse.ArgumentParser, store: bool = True) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--policy", default=None, metavar="FILE",
                   help="policy file (env POLICER_POLICY, default policies/example.yaml)")
    if store:
        g.add_argument("--redis", default=None, metavar="URL",
                       help="store URL: redis://, rediss://, unix://, redis+sentinel://, "
                            "redis+cluster:// or memory:// (env POLICER_REDIS_URL, default "
                            "redis://127.0.0.1:6379/0; see docs/redis.md)")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.add_argument("--log-level", default=None, help="debug, info, warning, error")
    g.add_argument("--log-format", default=None, choices=("json", "console"))


def _call_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("call")
    g.add_argument("--call-id", default=None, help="Call-ID (default: random)")
    g.add_argument("--from-tag", default=None, help="From-tag (default: random)")
    g.add_argument("--from", dest="from_user", default="", metavar="USER", help="From user")
    g.add_argument("--from-domain", default="", metavar="DOMAIN")
    g.add_argument("--to", default="", metavar="NUMBER", help="the dialled number")
    g.add_argument("--source-ip", default="")
    g.add_argument("--auth-user", default="")
    g.add_argument("--gateway", default="", metavar="GW",
                   help="where the call is sent (a policy's gateway profiles)")
    g.add_argument("--header", action="append", default=[], metavar="'Name: value'",
                   help="a SIP header the policy reads (repeatable)")


def _dialog_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--call-id", required=True)
    p.add_argument("--from-tag", required=True)


def _policy(args: argparse.Namespace) -> Policy:
    path = args.policy or os.environ.get("POLICER_POLICY") or DEFAULT_POLICY
    return load_policy(path)


def _url(args: argparse.Namespace) -> str:
    return str(getattr(args, "redis", None) or os.environ.get("POLICER_REDIS_URL")
               or DEFAULT_REDIS)


def _store(args: argparse.Namespace, policy: Policy) -> Store:
    try:
        return open_store(_url(args), policy.namespace,
                          timeout_ms=max(policy.store_timeout_ms, 2000), policy=policy)
    except ValueError as e:
        raise CliError(f"--redis: {e}") from None


def _engine(args: argparse.Namespace) -> Engine:
    from policer.engine import Engine

    policy = _policy(args)
    return Engine(policy, _store(args, policy))


def _call(args: argparse.Namespace) -> Call:
    headers: dict[str, str] = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise CliError(f"--header {h!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    return Call.from_raw(
        args.call_id or uuid.uuid4().hex,
        args.from_tag or uuid.uuid4().hex[:10],
        from_user=args.from_user,
        from_domain=args.from_domain,
        ruri_user=args.to,
        to_user=args.to,
        source_ip=args.source_ip,
        auth_user=args.auth_user,
        headers=headers,
        gateway=args.gateway,
    )


def _print_json(obj: Any) -> None:
    print(json.dumps(printable_data(obj), indent=None, sort_keys=False))


def _ts(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _dialog_dict(d: DialogInfo) -> dict[str, Any]:
    return {
        "id": d.dialog_id,
        "call_id": d.info.get("call_id", ""),
        "from": d.info.get("from", ""),
        "to": d.info.get("to", ""),
        "class": d.info.get("class", ""),
        "node": d.info.get("node", ""),
        "state": d.state,
        "init_ts": d.init_ms / 1000 if d.init_ms else None,
        "start_ts": d.start_ms / 1000 if d.start_ms else None,
        "end_ts": d.end_ms / 1000 if d.end_ms else None,
        "deadline_ts": d.deadline_ms / 1000 if d.deadline_ms else None,
        "end_reason": d.end_reason or None,
        "profiles": list(d.profiles),
        "variables": dict(d.variables),
    }


def _print_dialog(d: DialogInfo) -> None:
    dd = printable_data(_dialog_dict(d))
    print(f"dialog {dd['id']}")
    for k in ("call_id", "from", "to", "class", "node", "state"):
        print(f"  {k:<10} {dd[k]}")
    print(f"  {'init':<10} {_ts(d.init_ms)}")
    print(f"  {'start':<10} {_ts(d.start_ms)}")
    if d.end_ms:
        print(f"  {'end':<10} {_ts(d.end_ms)} ({d.end_reason})")
    print(f"  {'deadline':<10} {_ts(d.deadline_ms)}")
    print(f"  {'profiles':<10} {', '.join(dd['profiles']) or '-'}")
    for k, v in dd["variables"].items():
        print(f"  var {k} = {v}")


# --------------------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    failed = False
    results = []
    for path in args.files:
        try:
            p = load_policy(path)
            results.append({"file": path, "valid": True, "errors": []})
            if not args.json:
                print(f"{path}: ok (namespace {p.namespace}, {len(p.profiles)} profiles, "
                      f"{len(p.limits)} limits)")
        except PolicyError as e:
            failed = True
            results.append({"file": path, "valid": False, "errors": e.errors})
            if not args.json:
                for line in e.errors:
                    print(line, file=sys.stderr)
    if args.json:
        _print_json(results)
    return EXIT_USAGE if failed else EXIT_OK


def _instant(text: str) -> int:
    """``--at``: an ISO 8601 time with its UTC offset, as Unix ms."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"--at: not an ISO 8601 time: {text!r} (e.g. "
                       "2026-12-01T09:30:00+01:00)") from None
    if t.tzinfo is None:
        raise CliError(f"--at: {text!r} has no UTC offset (add one, e.g. +01:00 or Z)")
    return _epoch_ms(int(t.timestamp() * 1000), "--at", text)


def _usage_text(v: ExplainRow) -> str:
    parts = []
    if v.rate_owed >= 0:
        parts.append(f"rate {v.rate_owed}/{v.rate_burst} owed")
    parts += [f"{per} {n}/{mx}" for per, n, mx in v.windows]
    return "; ".join(parts)


def cmd_explain(args: argparse.Namespace) -> int:
    engine = _engine(args)
    at = _instant(args.at) if args.at else None
    x = engine.explain(_call(args), at)
    if args.json:
        _print_json(x.as_dict())
        return EXIT_OK
    print(f"number      {printable(x.number) or '(none)'}")
    print(f"class       {x.number_class or '(none)'}{'  [emergency]' if x.emergency else ''}")
    if x.decision.direction is not None:
        print(f"direction   {x.decision.direction}")
    print("memberships")
    for v in x.limits:
        name = v.profile if v.value is None else f"{v.profile}={printable(v.value)}"
        usage = _usage_text(v)
        if v.max < 0 and not usage:
            print(f"  {name:<28} {v.count:>6}  (counted, no limit)")
            continue
        flags = []
        if v.live_limit:
            flags.append("live limit")
        if v.effective_max != v.max:
            flags.append(f"effective {v.effective_max}")
        if v.shadow:
            flags.append("shadow")
        if usage:
            flags.append(usage)
        if v.would_trip:
            flags.append("FULL" if v.kind == "concurrent" else f"FULL: {v.kind}")
        extra = f"  ({', '.join(flags)})" if flags else ""
        mx = str(v.max) if v.max >= 0 else "-"
        print(f"  {name:<28} {v.count:>6} / {mx:<6}{extra}")
    d = x.decision
    if d.admitted:
        print("decision    admit" + ("  (emergency bypass over " + str(d.limit) + ")"
                                     if d.bypass else ""))
    else:
        ra = f", Retry-After {d.retry_after}" if d.retry_after is not None else ""
        print(f"decision    reject {d.code} {d.reason} (limit {d.limit}: "
              f"{_kind_text(d)}{ra})")
    if d.max_duration is not None:
        print(f"max duration {d.max_duration}s")
    return EXIT_OK


def _kind_text(d: Decision) -> str:
    if d.kind == "calls":
        return f"calls {d.count}/{d.max} per {d.window}"
    if d.kind == "rate":
        return f"rate, {d.count} owed of burst {d.max}"
    if d.kind == "parent":
        return "no parent registered for the call's value"
    if d.kind == "fraud":
        return "fraud rule: the value is blocked (policer blocks list)"
    return f"{d.count}/{d.max}"


def cmd_admit(args: argparse.Namespace) -> int:
    engine = _engine(args)
    d = engine.admit(_call(args))
    if d.fallback:
        # an operator's command must not pretend: the store was not reached
        raise CliError(f"store error: {d.error}", EXIT_STORE)
    if args.json:
        _print_json(d.as_dict())
    elif d.admitted:
        extra = " (emergency bypass)" if d.bypass else ""
        print(f"admitted {d.dialog_id}{extra}")
    else:
        ra = f" Retry-After: {d.retry_after}" if d.retry_after is not None else ""
        print(f"rejected {d.code} {d.reason} (limit {d.limit}: {_kind_text(d)}){ra}")
    return EXIT_OK if d.admitted else EXIT_REJECTED


def cmd_egress(args: argparse.Namespace) -> int:
    if not is_dialog_id(args.dialog_id):
        raise CliError(f"DIALOG_ID {printable(args.dialog_id[:80])!r} is not a dialog id "
                       "policer gave (admit --json prints it: dialog_id)")
    engine = _engine(args)
    r = engine.egress(args.dialog_id, args.gateway)
    if r.fallback:
        raise CliError(f"store error: {r.error}", EXIT_STORE)
    if args.json:
        _print_json(r.as_dict())
    elif r.taken:
        held = ", ".join(printable(m) for m in r.memberships) or "no gateway profile"
        extra = "" if r.known else " (a dialog the store does not know: nothing counted)"
        print(f"taken {printable(args.gateway)}: {held}{extra}")
    else:
        ra = f" Retry-After: {r.retry_after}" if r.retry_after is not None else ""
        what = "no parent registered" if r.kind == "parent" else \
            f"{r.kind} {r.count}/{r.max}"
        print(f"full {r.code} {r.reason} (limit {r.limit}: {what}){ra}")
    return EXIT_OK if r.taken else EXIT_REJECTED


def _dialog_event(args: argparse.Namespace, fn: Callable[[Store, str], object]) -> int:
    policy = _policy(args)
    store = _store(args, policy)
    did = dialog_id(args.call_id, args.from_tag)
    result = fn(store, did)
    ok = bool(result)
    if args.json:
        out: dict[str, Any] = {"dialog_id": did, "ok": ok}
        if hasattr(result, "as_dict"):
            out["record"] = result.as_dict()
        _print_json(out)
    else:
        print(f"{args.command} {did}: {'ok' if ok else 'not a live dialog'}")
    return EXIT_OK if ok else EXIT_REJECTED


def cmd_confirm(args: argparse.Namespace) -> int:
    policy = _policy(args)
    return _dialog_event(args, lambda s, d: s.confirm(d, policy.timeouts.dialog_ms))


def cmd_release(args: argparse.Namespace) -> int:
    return _dialog_event(args, lambda s, d: s.release(d, args.reason))


def _check_profile(policy: Policy, name: str) -> bool:
    p = policy.profile(name)
    if p is None:
        known = ", ".join(x.name for x in policy.profiles)
        raise CliError(f"unknown profile {name!r} (known: {known})")
    return p.valued


def cmd_profile_size(args: argparse.Namespace) -> int:
    policy = _policy(args)
    valued = _check_profile(policy, args.profile)
    store = _store(args, policy)
    if valued and args.value is None:
        n = sum(store.profile_values(args.profile).values())
    else:
        n = store.profile_size(args.profile, args.value if valued else None)
    usage = None
    if not valued or args.value is not None:
        usage = store.usage(args.profile, args.value if valued else None)
    if args.json:
        out: dict[str, Any] = {"profile": args.profile, "value": args.value, "size": n}
        if usage is not None:
            out["rate_usage"] = usage.rate
            out["calls"] = dict(usage.calls)
        _print_json(out)
    else:
        extra = ""
        if usage is not None and usage.rate is not None:
            extra += f"\trate {usage.rate * 100:.0f}%"
        if usage is not None:
            extra += "".join(f"\t{per} {c}" for per, c in usage.calls.items())
        print(f"{n}{extra}")
    return EXIT_OK


def cmd_profile_list(args: argparse.Namespace) -> int:
    policy = _policy(args)
    valued = _check_profile(policy, args.profile)
    store = _store(args, policy)
    if valued and args.value is None:
        values = store.profile_values(args.profile)
        if args.json:
            _print_json({"profile": args.profile, "values": values})
        else:
            for v, n in sorted(values.items(), key=lambda kv: (-kv[1], kv[0])):
                print(f"{printable(v)}\t{n}")
        return EXIT_OK
    dialogs = store.profile_list(args.profile, args.value if valued else None)
    if args.json:
        _print_json([_dialog_dict(d) for d in dialogs])
    else:
        for d in dialogs:
            _print_dialog(d)
    return EXIT_OK


def cmd_load(args: argparse.Namespace) -> int:
    """Compile the policy into its function library and make it the one every proxy of
    the namespace decides by (FUNCTION LOAD REPLACE; every primary of a Cluster)."""
    policy = _policy(args)
    library = compile_policy(policy)
    if args.print:
        sys.stdout.write(library.text)
        return EXIT_OK
    store = _store(args, policy)
    before = store.loaded_hash()
    policy_hash = store.load(policy)
    out = {
        "namespace": policy.namespace,
        "library": library.name,
        "policy_hash": policy_hash,
        "previous_hash": before,
        "changed": before != policy_hash,
        "functions": [library.function(op) for op in ("admit", "egress", "batch", "tick", "read",
                                                       "admitm")],
        "attributes": list(library.attributes),
    }
    _audit_logger().info("policy_loaded", namespace=policy.namespace, source=policy.source,
                         policy_hash=policy_hash, previous_hash=before)
    if args.json:
        _print_json(out)
    else:
        state = "loaded" if out["changed"] else "already loaded"
        print(f"{state}: {library.name} ({policy.source}) policy_hash {policy_hash}")
        print(f"  admit: FCALL {library.function('admit')} 1 {library.prefix} NODE CALL-ID "
              f"FROM-TAG ATTRS  (ATTRS: {', '.join(library.attributes)})")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    policy = _policy(args)
    store = _store(args, policy)
    stats: dict[str, Any] = dict(store.stats())
    loaded = store.loaded_hash()
    stats["policy_hash"] = loaded
    stats["policy_file_hash"] = compile_policy(policy).policy_hash
    # each node's clock minus Redis's, as the node last measured it (nodes with a lease)
    leased = store.nodes()
    skews = {n: ms / 1000 for n, (ms, _) in sorted(store.node_skews().items()) if n in leased}
    if args.json:
        _print_json({**stats, "clock_skew_seconds": skews})
    else:
        for k, v in stats.items():
            print(f"{k:<16} {v}")
        for n, skew in skews.items():
            note = "  (beyond 0.5 s: check NTP)" if abs(skew) > 0.5 else ""
            print(f"{'clock_skew':<16} {skew:+.3f} s  {printable(n)}{note}")
    return EXIT_OK


def _live_profile(args: argparse.Namespace, check: Callable[[Policy, str], object]
                  ) -> tuple[Policy, Store]:
    """The policy and store of a command that changes a profile's live state
    (``limits``, ``parent``): ``check`` raises ValueError when the profile cannot have
    it."""
    policy = _policy(args)
    _check_profile(policy, args.profile)
    try:
        check(policy, args.profile)
    except ValueError as e:
        raise CliError(str(e)) from None
    return policy, _store(args, policy)


def cmd_limits(args: argparse.Namespace) -> int:
    policy, store = _live_profile(args, live_limits.valued_profile)
    if args.action == "get":
        if args.value is None:
            default_max = live_limits.default_max(policy, args.profile)
            table = live_limits.table(store, args.profile)
            if args.json:
                _print_json({"profile": args.profile, "default": default_max, "limits": table})
            else:
                print(f"default\t{default_max if default_max is not None else '-'}")
                for v, n in sorted(table.items()):
                    print(f"{printable(v)}\t{n}")
            return EXIT_OK
        reading = live_limits.read(policy, store, args.profile, args.value)
        if args.json:
            _print_json(reading.as_dict())
        else:
            src = "live" if reading.live is not None else "policy default"
            effective = reading.effective
            print(f"{effective if effective is not None else 'unlimited'} ({src})")
        return EXIT_OK
    if args.value is None:
        raise CliError(f"limits {args.action}: VALUE is required")
    if args.rate is not None or args.calls is not None:
        change = _timed_limit(args, policy, store)
    else:
        if args.action == "set" and args.max is None:
            raise CliError(f"limits set: MAX (0 to {MAX_CONCURRENT}) is required")
        change = live_limits.set_max(policy, store, args.profile, args.value,
                                     args.max if args.action == "set" else None)
    if args.json:
        _print_json(change.as_dict())
    else:
        what = f" {change.kind}" if change.kind else ""
        print(f"{change.profile} {printable(change.value)}{what}: "
              f"{change.old if change.old is not None else '-'} -> "
              f"{change.new if change.new is not None else f'policy default ({change.default})'}")
    return EXIT_OK


def cmd_parent(args: argparse.Namespace) -> int:
    policy, store = _live_profile(args, parents.level)
    if args.action == "list":
        if args.value is not None:
            raise CliError("parent list: takes PROFILE only")
        table = parents.listing(policy, store, args.profile)
        if args.json:
            _print_json({"profile": args.profile, "parents": table})
        else:
            for v, row in sorted(table.items()):
                print(f"{printable(v)}\t{printable(row['parent'])}\t{row['source']}")
        return EXIT_OK
    if args.value is None:
        raise CliError(f"parent {args.action}: VALUE is required")
    if args.action == "set" and args.parent is None:
        raise CliError("parent set: PARENT is required")
    if args.action == "unset" and args.parent is not None:
        raise CliError("parent unset: takes PROFILE VALUE only")
    try:
        change = parents.set_parent(policy, store, args.profile, args.value,
                                    args.parent if args.action == "set" else None)
    except parents.ParentError as e:
        raise CliError(str(e)) from None
    if args.json:
        _print_json(change.as_dict())
    else:
        new = change.new if change.new is not None else \
            f"policy default ({change.default})" if change.default is not None else "none"
        print(f"{change.profile} {printable(change.value)}: "
              f"{printable(change.old) if change.old is not None else '-'} -> {printable(new)}")
    return EXIT_OK


def _timed_limit(args: argparse.Namespace, policy: Policy, store: Store
                 ) -> live_limits.LimitChange:
    """``limits set|unset PROFILE VALUE --rate N/PER [--burst B]`` or ``--calls N/PER``:
    a live call rate or calendar cap for one value (audited like a live max)."""
    if args.rate is not None:
        rate = None
        if args.action == "set":
            mx, per_ms = _per(args.rate, "--rate", "10/s")
            rate = Rate(mx, per_ms, args.burst if args.burst is not None else mx)
        try:
            return live_limits.set_rate(policy, store, args.profile, args.value, rate)
        except live_limits.LiveLimitError as e:
            raise CliError(f"--rate {args.rate}: {e}") from None
    text = str(args.calls)
    per = text.rpartition("/")[2]
    try:
        live_limits.window_max(policy, args.profile, per, args.value)
    except live_limits.LiveLimitError as e:
        raise CliError(f"--calls {text}: {e}") from None
    calls_max = None
    if args.action == "set":
        try:
            calls_max = _whole(text.rpartition("/")[0], 0, MAX_WINDOW_CALLS)
        except ValueError as e:
            raise CliError(f"--calls {text}: MAX/WINDOW, MAX {e}, e.g. 500/1d") from None
    return live_limits.set_calls(policy, store, args.profile, args.value, per, calls_max)


def _per(text: str, option: str, example: str) -> tuple[int, int]:
    """``N/PER`` (``10/s``, ``600/1m``) as (N, PER in ms)."""
    n_text, _, per = text.partition("/")
    per_ms = parse_duration_ms(per) if per else None
    if per_ms is None or not 1 <= per_ms <= MAX_RATE_PER_MS:
        raise CliError(f"{option} {text}: expected N/PER with PER from 1ms to 1d, "
                       f"e.g. {example}")
    try:
        n = _whole(n_text, 1, MAX_RATE)
    except ValueError as e:
        raise CliError(f"{option} {text}: N/PER, N {e}, e.g. {example}") from None
    return n, per_ms


def _audit_logger() -> Any:
    from policer.log import get_logger

    return get_logger("policer.audit")


def cmd_dialog(args: argparse.Namespace) -> int:
    policy = _policy(args)
    store = _store(args, policy)
    did = args.id
    if args.action == "show":
        d = store.dialog(did)
        if d is None:
            if args.json:
                _print_json(None)
            else:
                print(f"no dialog {printable(did)}", file=sys.stderr)
            return EXIT_REJECTED
        if args.json:
            _print_json(_dialog_dict(d))
        else:
            _print_dialog(d)
        return EXIT_OK
    rec = store.release(did, "released_by_operator")
    _audit_logger().info("dialog_ended_by_operator", dialog_id=did, found=rec is not None)
    if args.json:
        _print_json({"dialog_id": did, "ended": rec is not None,
                     "record": rec.as_dict() if rec else None})
    else:
        print(f"{printable(did)}: {'ended' if rec else 'not a live dialog'}")
    return EXIT_OK if rec else EXIT_REJECTED


T = TypeVar("T")


def _tail(first: Sequence[T], after: Callable[[str], Sequence[T]], id_of: Callable[[T], str],
          show: Callable[[T], None], args: argparse.Namespace) -> int:
    """Print ``first`` (a stream's last entries), then with ``--follow`` what comes
    after, every ``--interval`` (``cdr tail``, ``alerts tail``)."""
    import time

    rows, last = first, ""
    while True:
        for row in rows:
            show(row)
        if rows:
            last = id_of(rows[-1])
        sys.stdout.flush()
        if not args.follow:
            return EXIT_OK
        time.sleep(args.interval)
        rows = after(last)


def cmd_cdr(args: argparse.Namespace) -> int:
    policy = _policy(args)
    store = _store(args, policy)
    records = store.call_records(count=1_000_000)

    def show(r: CallRecord) -> None:
        if args.json:
            _print_json(r.as_dict())
        else:
            d = printable_data(r.as_dict())
            print(f"{_ts(r.end_ms)} {d['Reason']:<9} billsec={d['BillSec']:<5} "
                  f"{d['From']} -> {d['To']} call-id={d['CallID']} node={d['Node']}")

    return _tail(records[-args.count:] if args.count else records,
                 lambda last: store.call_records(count=10_000, after=last),
                 lambda r: r.record_id, show, args)


def cmd_alerts(args: argparse.Namespace) -> int:
    """``alerts tail [--follow] [--json]``: the fraud events, oldest first."""
    policy = _policy(args)
    store = _store(args, policy)

    def show(e: FraudEvent) -> None:
        if args.json:
            _print_json({k: v for k, v in e.as_dict().items() if k != "id"})
        else:
            print(f"{_ts(e.at_ms)} {e.level:<8} {e.rule} {e.key}={printable(e.value)} "
                  f"{e.stat} {e.count}>={e.threshold} per {e.window} {e.action}")

    return _tail(store.fraud_events(count=args.count or 1_000_000),
                 lambda last: store.fraud_events(count=10_000, after=last),
                 lambda e: e.id, show, args)


def cmd_blocks(args: argparse.Namespace) -> int:
    """``blocks list [--json]``, ``blocks lift KEY VALUE``."""
    policy = _policy(args)
    if args.action == "list":
        if args.key is not None:
            raise CliError("blocks list: takes no KEY")
        rows = _store(args, policy).fraud_blocks()
        if args.json:
            _print_json({"blocks": [b.as_dict() for b in rows]})
        else:
            for b in rows:
                print(f"{b.rule}\t{printable(b.value)}\tuntil {_ts(b.until_ms)}")
        return EXIT_OK
    if args.key is None or args.value is None:
        raise CliError("blocks lift: KEY and VALUE are required")
    try:
        fraud_admin.rules_of_key(policy, args.key)
    except fraud_admin.FraudError as e:
        raise CliError(str(e)) from None
    done = fraud_admin.lift(policy, _store(args, policy), args.key, args.value)
    if args.json:
        _print_json(done.as_dict())
    else:
        print(f"{args.key} {printable(args.value)}: "
              + (f"lifted ({', '.join(done.rules)})" if done.rules else "was not blocked"))
    return EXIT_OK


def cmd_fraud(args: argparse.Namespace) -> int:
    """``fraud status [--json]``: per rule, the values closest to their thresholds."""
    policy = _policy(args)
    if not policy.fraud:
        raise CliError("the policy has no fraud rules (fraud: in the policy file)")
    rows = fraud_admin.status(policy, _store(args, policy), args.top)
    if args.json:
        _print_json({"rules": rows})
        return EXIT_OK
    for r in rows:
        print(f"{r['rule']} (key {r['key']}, per {r['window']}"
              f"{', shadow' if r['shadow'] else ''})")
        for v in r["values"]:
            stats = " ".join(f"{k}={s['count']}/{s['critical'] or s['warning']}"
                             for k, s in v["stats"].items())
            blocked = f" blocked until {_ts(v['blocked_until'])}" if v["blocked_until"] \
                else ""
            print(f"  {printable(v['value'])}\t{v['closest']:.2f}\t{stats}{blocked}")
    return EXIT_OK


def _time_ms(text: str, now_ms: int, what: str) -> int:
    """A time: a duration before now (``24h``), epoch ms, or ISO 8601 (UTC if no zone)."""
    ago = parse_duration_ms(text)
    if ago is not None:
        return _epoch_ms(now_ms - ago, what, text)
    if re.fullmatch(r"[0-9]+", text):  # epoch ms
        try:
            return _whole(text, 0, MAX_EPOCH_MS)
        except ValueError as e:
            raise CliError(f"{what} {e}") from None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"{what} {text!r}: a duration before now (24h), epoch ms or an "
                       f"ISO 8601 time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return _epoch_ms(int(t.timestamp() * 1000), what, text)


def cmd_replay(args: argparse.Namespace) -> int:
    from policer.replay import replay_store

    candidate = load_policy(args.policy)
    path = args.live_policy or os.environ.get("POLICER_POLICY") or DEFAULT_POLICY
    live = load_policy(path)
    store = _store(args, live)
    now = store.now_ms()
    since = _time_ms(args.since, now, "--since")
    until = _time_ms(args.until, now, "--until") if args.until else None
    report = replay_store(candidate, store, since, until)
    if args.json:
        _print_json(report.as_dict())
        return EXIT_OK
    a = report
    print(f"replay of {live.namespace} ({path}) under {candidate.namespace} ({args.policy}), "
          f"{_ts(since)} .. {_ts(until or now)}")
    print(f"{'':<10} {'candidate':>10} {'actual':>10}")
    print(f"{'attempts':<10} {a.attempts:>10} {a.attempts:>10}")
    print(f"{'admitted':<10} {a.admitted:>10} {a.actual_admitted:>10}")
    print(f"{'rejected':<10} {a.rejected:>10} {a.actual_rejected:>10}")
    print(f"changed decisions: {a.changed_total}")
    if a.by_limit:
        print("rejections per limit:")
        for name, n in a.by_limit.most_common(args.top):
            print(f"  {printable(name) or '-':<30} {n:>8}")
    if a.by_value:
        print("rejections per value:")
        for name, n in a.by_value.most_common(args.top):
            print(f"  {printable(name):<30} {n:>8}")
    if a.gateway_full:
        print("calls a gateway's caps would have refused (the proxy tries the next one):")
        for name, n in a.gateway_full.most_common(args.top):
            print(f"  {printable(name):<30} {n:>8}")
    if a.blocked:
        print("values the candidate's fraud rules would have blocked:")
        for b in a.blocked[:args.top]:
            ends = f"until {_ts(b['until'])}" if b["until"] is not None else "(shadow)"
            print(f"  {b['rule']} {b['key']}={printable(b['value'])} at {_ts(b['at'])} "
                  f"{ends}: {b['stat']} {b['count']}>={b['threshold']}")
    if a.peak:
        print("peak concurrency:")
        for name, n in sorted(a.peak.items(), key=lambda kv: (-kv[1], kv[0]))[:args.top]:
            print(f"  {printable(name):<30} {n:>8}")
    for c in a.changed[:args.top]:
        print(f"  changed {_ts(c['time_ms'])} call-id={printable(c['call_id'])} "
              f"actual={_short(c['actual'])} candidate={_short(c['candidate'])}")
    if a.estimated_holds:
        print(f"note: {a.estimated_holds} calls rejected in fact are admitted here and held "
              f"for the mean hold time of the replayed calls ({a.mean_hold_ms / 1000:.1f} s)")
    for source, n in a.missing_attributes.most_common():
        print(f"note: {n} attempts were recorded without {source}, which the candidate "
              f"reads (taken as empty)")
    return EXIT_OK


def _short(d: dict[str, Any]) -> str:
    if d.get("admitted"):
        return "admitted"
    return f"{d.get('code')} {d.get('limit') or '-'} ({d.get('kind') or '-'})"


def cmd_exporter(args: argparse.Namespace) -> int:
    from policer.exporter import parse_values, serve

    try:
        listed = parse_values(args.values)
    except ValueError as e:
        raise CliError(str(e)) from None
    path = args.policy or os.environ.get("POLICER_POLICY") or DEFAULT_POLICY
    policy = load_policy(path)
    try:
        serve(policy, _store(args, policy), args.listen, top=args.top, listed=listed,
              policy_path=str(path))
    except ValueError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"--listen {args.listen}: {e.strerror or e}") from None
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from policer import serve

    if args.max_connections < 1:
        raise CliError("--max-connections must be at least 1")
    for name in ("head_timeout", "idle_timeout"):
        value = getattr(args, name)
        if not 0 < value <= 86400:  # NaN fails too
            raise CliError(f"--{name.replace('_', '-')} must be a number of seconds in "
                           "(0, 86400]")
    limits = serve.Limits(args.max_connections, args.head_timeout, args.idle_timeout)
    serve.prepare_metrics(args.workers)  # before prometheus-client is first imported
    from policer.exporter import parse_listen
    from policer.metrics import worker_metrics

    try:
        host, port = parse_listen(args.listen)
        token = serve.read_token(args.token_file) if args.token_file else None
        serve.check_listener(host, token, args.insecure)
    except (ValueError, serve.ServeError) as e:
        raise CliError(str(e)) from None
    policy = _policy(args)
    try:  # a data-plane client: the policy's store_timeout bounds each call
        store = open_store(_url(args), policy.namespace, timeout_ms=policy.store_timeout_ms,
                           policy=policy)
    except ValueError as e:
        raise CliError(f"--redis: {e}") from None
    path = args.policy or os.environ.get("POLICER_POLICY") or DEFAULT_POLICY
    from policer.engine import Engine, NodeInUse

    engine = Engine(policy, store, metrics=worker_metrics(), lease=True, watch=path)
    try:
        return serve.run(engine, host, port, workers=args.workers, token=token,
                         limits=limits)
    except NodeInUse as e:  # another live process holds this node: it must not start
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"--listen {args.listen}: {e.strerror or e}") from None


def cmd_top(args: argparse.Namespace) -> int:
    from policer.top import run_top

    policy = _policy(args)
    return run_top(policy, _store(args, policy), once=args.once, interval=args.interval,
                   top=args.top)


def cmd_reconcile(args: argparse.Namespace) -> int:
    from policer.reconcile import fetch_dialogs, reconcile

    policy = _policy(args)
    store = _store(args, policy)
    reports = []
    failed = False
    for spec in args.proxy:
        node, sep, address = spec.partition("=")
        if not sep or not node or not address:
            raise CliError(f"--proxy {spec!r}: expected NODE=ADDRESS")
        listed_at = store.now_ms()
        try:
            dialogs = fetch_dialogs(address, timeout=args.timeout)
        except (OSError, ValueError) as e:
            failed = True
            print(f"policer: {node}: cannot list dialogs at {address}: {e}", file=sys.stderr)
            continue
        reports.append(reconcile(policy, store, node, dialogs, dry_run=args.dry_run,
                                 listed_at_ms=listed_at))
    if args.json:
        _print_json([r.as_dict() for r in reports])
    else:
        verb = "would " if args.dry_run else ""
        for r in reports:
            print(f"{printable(r.node)}: {r.proxy_dialogs} dialogs on the proxy, {r.kept} already "
                  f"counted, {verb}add {len(r.added)}, {verb}remove {len(r.removed)}"
                  + (f" ({len(r.partial)} without policer's call attributes)"
                     if r.partial else ""))
            for did in r.added:
                print(f"  + {printable(did)}")
            for did in r.removed:
                print(f"  - {printable(did)}")
    return EXIT_STORE if failed else EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    policy = _policy(args)
    store = _store(args, policy)
    now = store.now_ms()
    rows: list[dict[str, Any]] = [
        {"node": n, "lease_left_s": round((until - now) / 1000, 1),
         "dialogs": len(store.node_dialogs(n))} for n, until in sorted(store.nodes().items())]
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            state = "LOST" if r["lease_left_s"] <= 0 else f"{r['lease_left_s']}s left"
            print(f"{printable(r['node']):<32} lease {state:<12} {r['dialogs']} dialogs")
    return EXIT_OK


#: Commands that run a tool of the repository (not part of the installed package): the
#: module ``python -m`` runs, from the checkout's root.
TOOLS = {"simulate": "lab.simulate", "bench": "benchmarks"}


def run_tool(command: str, argv: Sequence[str]) -> int:
    """``policer simulate`` / ``policer bench``: run the tool from the checkout this
    package is installed from (editable, as bin/setup does), with the same interpreter."""
    module = TOOLS[command]
    root = Path(__file__).resolve().parent.parent
    if not (root / module.split(".")[0] / "__init__.py").is_file():
        raise CliError(f"{command}: runs from a checkout of the policer repository "
                       f"({module.split('.')[0]}/ is not part of the installed package); "
                       f"install with bin/setup (pip install -e .) and run it from there")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return subprocess.call([sys.executable, "-m", module, *argv], env=env)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policer",
        description="Call admission control for SIP proxies: dialog profiles shared in Redis.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="validate policy files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check, log_level=None, log_format=None)

    p = sub.add_parser("explain", help="what admit would decide now, changing nothing")
    _call_options(p)
    p.add_argument("--at", default=None, metavar="TIME",
                   help="evaluate schedules and calendar windows as if it were TIME "
                        "(ISO 8601 with offset); counts are those of now")
    _common(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("admit", help="admit a call (exit 0 admitted, 1 rejected)")
    _call_options(p)
    _common(p)
    p.set_defaults(func=cmd_admit)

    p = sub.add_parser("confirm", help="mark a dialog answered")
    _dialog_options(p)
    _common(p)
    p.set_defaults(func=cmd_confirm)

    p = sub.add_parser("release", help="end a dialog (idempotent)")
    _dialog_options(p)
    p.add_argument("--reason", default="bye",
                   choices=("bye", "cancel", "failed", "timeout", "released_by_operator"))
    _common(p)
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("profile", help="profile sizes and members (kamcmd dlg.profile_*)")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, func, text in (("size", cmd_profile_size, "live dialogs in a profile"),
                               ("list", cmd_profile_list, "the dialogs in a profile")):
        q = psub.add_parser(action, help=text)
        q.add_argument("profile", metavar="PROFILE")
        q.add_argument("value", nargs="?", default=None, metavar="VALUE")
        _common(q)
        q.set_defaults(func=func)

    p = sub.add_parser("load", help="compile the policy into its Redis function library and "
                                    "load it: every proxy decides by it from now on")
    p.add_argument("--print", action="store_true",
                   help="print the library (Lua) instead of loading it")
    _common(p)
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("stats", help="cluster-wide dialog statistics")
    _common(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("limits", help="live per-value limits (override the policy default)")
    p.add_argument("action", choices=("set", "get", "unset"))
    p.add_argument("profile", metavar="PROFILE")
    p.add_argument("value", nargs="?", default=None, metavar="VALUE")
    p.add_argument("max", nargs="?", type=_whole_type(0, MAX_CONCURRENT), default=None,
                   metavar="MAX", help=f"a live max of concurrent calls, 0 to {MAX_CONCURRENT}")
    p.add_argument("--rate", nargs="?", const="", default=None, metavar="N/PER",
                   help="a live call rate instead of a max, e.g. 10/s (unset: --rate)")
    p.add_argument("--burst", type=_whole_type(1, MAX_RATE), default=None,
                   help=f"the live rate's burst, 1 to {MAX_RATE} (default N)")
    p.add_argument("--calls", default=None, metavar="N/WINDOW",
                   help="a live calendar cap of one of the profile's windows, e.g. 500/1d "
                        "(unset: --calls 1d)")
    _common(p)
    p.set_defaults(func=cmd_limits)

    p = sub.add_parser("egress", help="send an admitted call to a gateway if it has room "
                                      "(exit 0 taken, 1 full)")
    p.add_argument("dialog_id", metavar="DIALOG_ID", help="as admit answered it")
    p.add_argument("--gateway", required=True, metavar="GW",
                   help="where the call is sent (host:port); '' leaves the gateway")
    _common(p)
    p.set_defaults(func=cmd_egress)

    p = sub.add_parser("parent", help="live parents of a hierarchy's levels (override the "
                                      "policy's parents)")
    p.add_argument("action", choices=("set", "unset", "list"))
    p.add_argument("profile", metavar="PROFILE", help="a level of a hierarchy")
    p.add_argument("value", nargs="?", default=None, metavar="VALUE",
                   help="a value of the profile PROFILE is the parent of")
    p.add_argument("parent", nargs="?", default=None, metavar="PARENT")
    _common(p)
    p.set_defaults(func=cmd_parent)

    p = sub.add_parser("alerts", help="the fraud guard's events (a capped stream in the "
                                      "store)")
    p.add_argument("action", choices=("tail",))
    p.add_argument("-n", "--count", type=_whole_type(0), default=20,
                   help="the last N events (0: all)")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--interval", type=_seconds_type(0.1), default=1.0, help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(func=cmd_alerts)

    p = sub.add_parser("blocks", help="values the fraud rules block: list, lift (audited)")
    p.add_argument("action", choices=("list", "lift"))
    p.add_argument("key", nargs="?", default=None, metavar="KEY",
                   help="a fraud rule's key (as in the policy: user, account, ...)")
    p.add_argument("value", nargs="?", default=None, metavar="VALUE")
    _common(p)
    p.set_defaults(func=cmd_blocks)

    p = sub.add_parser("fraud", help="the fraud rules' values closest to their thresholds")
    p.add_argument("action", choices=("status",))
    p.add_argument("--top", type=_whole_type(1), default=10,
                   help="values shown per rule [10]")
    _common(p)
    p.set_defaults(func=cmd_fraud)

    p = sub.add_parser("dialog", help="show or end one dialog")
    p.add_argument("action", choices=("show", "end"))
    p.add_argument("id", metavar="DIALOG_ID")
    _common(p)
    p.set_defaults(func=cmd_dialog)

    p = sub.add_parser("cdr", help="call-end records")
    p.add_argument("action", choices=("tail",))
    p.add_argument("-n", "--count", type=_whole_type(0), default=20,
                   help="the last N records (0: all)")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--interval", type=_seconds_type(0.1), default=1.0, help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(func=cmd_cdr)

    p = sub.add_parser("replay", help="what a candidate policy would have decided on the "
                                      "recorded attempts (reads the store only)")
    p.add_argument("--policy", required=True, metavar="CANDIDATE.yaml",
                   help="the candidate policy (its namespace may differ)")
    p.add_argument("--live-policy", default=None, metavar="FILE",
                   help="the live policy, whose namespace holds the recording (env "
                        "POLICER_POLICY, default policies/example.yaml)")
    p.add_argument("--since", default="24h",
                   help="from: a duration before now (24h), epoch ms or ISO 8601 time")
    p.add_argument("--until", default=None, help="to (default now); as --since")
    p.add_argument("--top", type=_whole_type(0, MAX_ROWS), default=10,
                   help=f"rows per table, 0 to {MAX_ROWS} (default 10)")
    p.add_argument("--redis", default=None, metavar="URL",
                   help="store URL (env POLICER_REDIS_URL, default redis://127.0.0.1:6379/0)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--log-level", default=None, help="debug, info, warning, error")
    p.add_argument("--log-format", default=None, choices=("json", "console"))
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("exporter", help="serve Prometheus metrics (cluster-wide, from the store)")
    p.add_argument("--listen", default="127.0.0.1:9477", metavar="HOST:PORT")
    p.add_argument("--top", type=_whole_type(0, MAX_ROWS), default=10,
                   help=f"series for the N busiest values of each valued profile, 0 to "
                        f"{MAX_ROWS} (default 10)")
    p.add_argument("--values", action="append", default=[], metavar="PROFILE=V1,V2",
                   help="values that always get a series (repeatable)")
    _common(p)
    p.set_defaults(func=cmd_exporter)

    p = sub.add_parser("serve", help="the decision service: admit, confirm, release... "
                                     "over HTTP/1.1 (JSON), for any SIP core")
    p.add_argument("--listen", default="127.0.0.1:9478", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:9478)")
    p.add_argument("--workers", type=_whole_type(1, MAX_WORKERS), default=1, metavar="N",
                   help=f"worker processes sharing the socket, 1 to {MAX_WORKERS} "
                        "(default 1)")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="file holding a bearer token every request must carry "
                        "(Authorization: Bearer TOKEN); required beyond loopback")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --listen without --token-file")
    p.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="connections each worker holds at most; one more gets 503 and is "
                        "closed at once (default 1024)")
    p.add_argument("--head-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a request (line, headers, body) must arrive whole within this "
                        "many seconds of its first byte, else 408 and close (default 10)")
    p.add_argument("--idle-timeout", type=float, default=75.0, metavar="SECONDS",
                   help="a keep-alive connection idle this long is closed (default 75)")
    _common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("top", help="live table of profiles, like top")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--interval", type=_seconds_type(0.1), default=1.0,
                   help=f"seconds between frames, 0.1 to {MAX_SECONDS:g} (default 1)")
    p.add_argument("--top", type=_whole_type(0, MAX_ROWS), default=3,
                   help=f"busiest values shown per valued profile, 0 to {MAX_ROWS} "
                        "(default 3)")
    _common(p)
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("reconcile", help="make the store agree with the proxies' own dialogs")
    p.add_argument("--proxy", action="append", default=[], required=True,
                   metavar="NODE=ADDRESS",
                   help="a proxy's node name and JSON-RPC address: its FIFO, e.g. "
                        "proxy-a=fifo:/run/policer/proxy-a/kamailio_rpc.fifo, or its "
                        "datagram socket unix:/path (replies up to 64 KB) (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="report, change nothing")
    p.add_argument("--timeout", type=_seconds_type(0.001), default=5.0,
                   help=f"seconds to wait for a proxy, up to {MAX_SECONDS:g} (default 5)")
    _common(p)
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("nodes", help="proxy nodes, their leases and dialogs")
    _common(p)
    p.set_defaults(func=cmd_nodes)

    # tools of the repository: their options are theirs (policer simulate --help)
    sub.add_parser("simulate", add_help=False,
                   help="a live simulation: worker processes place calls through a real "
                        "Redis (from a checkout)")
    sub.add_parser("bench", add_help=False,
                   help="measure decisions/s and latency (from a checkout)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # SIP values may hold bytes that are not UTF-8 (kept as surrogate escapes): print
    # them escaped rather than fail
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        try:
            return run_tool(argv[0], argv[1:])
        except CliError as e:
            print(f"policer: {e}", file=sys.stderr)
            return e.status
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(getattr(args, "log_level", None), getattr(args, "log_format", None))
    try:
        status: int = args.func(args)
        return status
    except PolicyError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except StoreError as e:
        print(f"policer: store error at {redact(_url(args))}: {redact(str(e))}", file=sys.stderr)
        return EXIT_STORE
    except CliError as e:
        print(f"policer: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
