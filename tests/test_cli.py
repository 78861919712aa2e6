"""The command line as operators and their scripts use it: exit codes, the
number alone for ``profile size``, the documented ``--json`` keys."""

from __future__ import annotations

from pathlib import Path

from tests.support.cli import EXAMPLE, ROOT, cli_json, log_events, run_cli


def test_check_accepts_every_shipped_policy() -> None:
    files = sorted(str(p) for p in (ROOT / "policies").glob("*.yaml"))
    proc = run_cli("check", *files)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": ok") == len(files)


def test_check_reports_every_error_with_its_place_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nnamespace: x\nlimts: {}\nprofiles:\n  u: {value: from_usr}\n")
    proc = run_cli("check", str(EXAMPLE), str(bad))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"{bad}:3:1: limts: unknown key (did you mean 'limits'?)",
        f"{bad}:5:14: profiles.u.value: unknown attribute 'from_usr' (did you mean 'from_user'?)",
    ]
    report = cli_json("check", str(bad))
    assert report[0]["valid"] is False and len(report[0]["errors"]) == 2


def test_admit_json_keys_and_exit_status(env: dict[str, str]) -> None:
    args = ("admit", "--from", "alice", "--to", "0301234567")
    for i in range(3):
        proc = run_cli(*args, "--call-id", f"c{i}", "--json", env=env)
        assert proc.returncode == 0, proc.stderr
    proc = run_cli(*args, "--call-id", "c3", "--from-tag", "x", "--json", env=env)
    assert proc.returncode == 1
    out = cli_json(*args, "--call-id", "c4", env=env)
    for key in ("admitted", "code", "reason", "retry_after", "limit", "bypass", "dialog_id"):
        assert key in out
    assert out["admitted"] is False
    assert (out["code"], out["reason"], out["retry_after"], out["limit"]) == (
        503, "Call Limit Reached", 30, "user")
    # an emergency call goes through over the user's limit, flagged as bypass
    sos = cli_json("admit", "--from", "alice", "--to", "112", env=env)
    assert sos["admitted"] is True and sos["bypass"] is True and sos["limit"] == "user"


def test_profile_size_prints_the_number_alone(env: dict[str, str]) -> None:
    for i, who in enumerate(("alice", "alice", "bob")):
        run_cli("admit", "--from", who, "--to", "5551234", "--call-id", f"s{i}",
                "--header", "X-Account: acme", env=env, check=True)
    assert run_cli("profile", "size", "total", env=env).stdout == "3\n"
    assert run_cli("profile", "size", "user", "alice", env=env).stdout == "2\n"
    assert run_cli("profile", "size", "user", env=env).stdout == "3\n"  # all values
    assert run_cli("profile", "size", "account", "acme", env=env).stdout == "3\n"
    assert run_cli("profile", "size", "international", env=env).stdout == "0\n"
    proc = run_cli("profile", "size", "nosuch", env=env)
    assert proc.returncode == 2 and "unknown profile 'nosuch'" in proc.stderr


def test_confirm_release_and_profile_list(env: dict[str, str]) -> None:
    run_cli("admit", "--from", "carol", "--to", "5551234", "--call-id", "L1", "--from-tag",
            "ft1", env=env, check=True)
    assert run_cli("confirm", "--call-id", "L1", "--from-tag", "ft1", env=env).returncode == 0
    dialogs = cli_json("profile", "list", "user", "carol", env=env)
    assert len(dialogs) == 1
    d = dialogs[0]
    assert (d["call_id"], d["state"], d["to"]) == ("L1", "confirmed", "5551234")
    assert d["init_ts"] and d["start_ts"] and d["deadline_ts"] > d["start_ts"]
    assert "user=carol" in d["profiles"] and "total" in d["profiles"]
    assert cli_json("profile", "list", "user", env=env)["values"] == {"carol": 1}
    assert run_cli("release", "--call-id", "L1", "--from-tag", "ft1", env=env).returncode == 0
    # idempotent: a second release finds nothing live, and says so with exit 1
    assert run_cli("release", "--call-id", "L1", "--from-tag", "ft1", env=env).returncode == 1
    assert run_cli("profile", "size", "total", env=env).stdout == "0\n"
    stats = cli_json("stats", env=env)
    assert stats["active"] == 0 and stats["processed"] == 1 and stats["ended"] == 1


def test_explain_changes_nothing_and_shows_counts(env: dict[str, str]) -> None:
    run_cli("admit", "--from", "dave", "--to", "00441632960123", "--header",
            "X-Account: acme", env=env, check=True)
    x = cli_json("explain", "--from", "dave", "--to", "0044123", "--header", "X-Account: acme",
                 env=env)
    assert x["class"] == "international"
    by = {(v["profile"], v["value"]): v for v in x["limits"]}
    assert by[("total", None)]["count"] == 1 and by[("total", None)]["effective_max"] == 90
    assert by[("international", None)]["max"] == 20
    assert by[("account", "acme")]["count"] == 1
    assert x["decision"]["admitted"] is True
    assert run_cli("profile", "size", "total", env=env).stdout == "1\n"
    text = run_cli("explain", "--from", "dave", "--to", "0044123", env=env).stdout
    assert "class       international" in text and "decision    admit" in text


def test_live_limits_take_effect_and_are_audited(env: dict[str, str]) -> None:
    proc = run_cli("limits", "set", "account", "acme", "1", env=env)
    assert proc.returncode == 0
    audit = [e for e in log_events(proc.stderr) if e.get("event") == "live_limit_changed"]
    assert audit and audit[0]["old"] is None and audit[0]["new"] == 1
    assert cli_json("limits", "get", "account", "acme", env=env)["effective"] == 1
    hdr = ("--header", "X-Account: acme", "--to", "5551234")
    assert run_cli("admit", "--from", "u1", *hdr, env=env).returncode == 0
    out = cli_json("admit", "--from", "u2", *hdr, env=env)
    assert (out["admitted"], out["code"], out["reason"], out["max"]) == (
        False, 486, "Account Call Limit", 1)
    proc = run_cli("limits", "unset", "account", "acme", env=env)
    audit = [e for e in log_events(proc.stderr) if e.get("event") == "live_limit_changed"]
    assert audit[0]["old"] == 1 and audit[0]["new"] is None
    assert run_cli("admit", "--from", "u2", *hdr, env=env).returncode == 0


def test_store_down_is_a_clear_error_without_the_password(tmp_path: Path) -> None:
    from lab.redis_server import free_port

    url = f"redis://admin:s3cret-pass@127.0.0.1:{free_port()}/0"
    env = {"POLICER_REDIS_URL": url, "POLICER_POLICY": str(EXAMPLE)}
    for args in (("profile", "size", "total"), ("stats", "--json"),
                 ("admit", "--to", "123", "--json")):
        proc = run_cli(*args, env=env)
        assert proc.returncode == 3, (args, proc.stdout, proc.stderr)
        assert "store error" in proc.stderr
        assert "s3cret-pass" not in proc.stderr + proc.stdout
        assert "Traceback" not in proc.stderr


def test_bench_runs_from_the_command_line_and_prints_the_documented_keys() -> None:
    """A tiny run (figures come from the full run in docs/benchmarks.md)."""
    import json

    proc = run_cli("bench", "--seconds", "0.2", "--warmup", "0", "--processes", "1,2",
                   "--expiry-members", "0", "--no-ceiling", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("ratio_p50", "bare_8_per_s", "ceiling_per_s", "over_admissions", "processes"):
        assert key in out
    assert out["over_admissions"] == 0
    assert set(out["processes"]) == {"1", "2"}
    for figures in out["processes"].values():
        assert {"decisions_per_s", "p50_us", "p99_us", "p999_us"} <= set(figures)
