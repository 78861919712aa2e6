"""Redis AUTH (requirepass), an ACL user with minimal rights, and TLS
(``rediss://`` with a private CA and client certificates): the engine admits
and releases through each, and a wrong password is a clean store error (a
fallback decision for a proxy, exit status 3 for the command line) whose
message, log lines and ``--json`` output never contain a password.

Every Redis here is a private ``redis-server`` on a free loopback port; the
certificates are made with ``openssl`` in the test's temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from redis.connection import SSLConnection

from lab.redis_server import RedisServer, free_port
from policer.call import Call
from policer.engine import Engine
from policer.policy import parse_policy
from policer.store import RedisStore, StoreError, open_store
from tests.support.cli import EXAMPLE, policy_copy, run_cli
from tests.support.policies import policy_yaml
from tests.support.serve import Serve
from tests.support.serve import body as serve_body
from tests.support.tls import TLSRedisServer, make_certificates, tls_url

#: Passwords chosen to be unmistakable in any output (and to need URL quoting).
ADMIN_PW = "Adm1n-s3cret-XQZ"
POLICER_PW = "p0licer/pw:XQZ@7"
WRONG_PW = "wr0ng-guess-XQZ"
SECRETS = (ADMIN_PW, POLICER_PW, WRONG_PW, quote(POLICER_PW, safe=""))

#: The policer ACL user: its own keys, data and script commands, nothing dangerous.
ACL_RULES = ("on", "resetkeys", "~policer:*", "resetchannels", "-@all", "+@read", "+@write",
             "+@scripting", "+@connection", "+@transaction", "+time", "-@dangerous",
             "-script|flush", "-script|kill", "-function", "+function|load")

def policy_text(namespace: str, on_error: str) -> str:
    return policy_yaml(namespace, classes={"international": {"prefixes": ["00"]},
                                           "local": {"default": True}},
                       profiles={"total": {}, "user": "from_user"}, limits={"total": 2},
                       on_store_error=on_error, store_timeout="2s")


def _clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a password leaked: {text[:500]}"


def _call(n: int, user: str = "alice") -> Call:
    return Call.from_raw(f"sec-{n}@test", "ft", from_user=user, from_domain="example.net",
                         ruri_user="5551234")


def _policy_file(tmp_path: Path, namespace: str, on_error: str = "admit") -> Path:
    """The policy ``_engine`` decides by, as a file for the command line: the CLI calls the
    library the engine loaded, and packs the attributes that policy reads."""
    path = tmp_path / f"{namespace}.yaml"
    path.write_text(policy_text(namespace, on_error))
    return path


def _engine(url: str, namespace: str, on_error: str = "admit") -> Engine:
    policy = parse_policy(policy_text(namespace, on_error), "<test>")
    return Engine(policy, open_store(url, namespace, timeout_ms=policy.store_timeout_ms),
                  node="sec")


def _admit_and_release(url: str, namespace: str) -> None:
    """Admit to the limit, reject, confirm, keep a variable, release: all real decisions."""
    engine = _engine(url, namespace)
    d1, d2, d3 = (engine.admit(_call(i)) for i in range(3))
    for d in (d1, d2, d3):
        assert not d.fallback, d.error
    assert d1.admitted and d2.admitted and not d3.admitted and d3.limit == "total"
    assert engine.confirm(d1.dialog_id)
    assert engine.set_var(d1.dialog_id, "billing", "acct-7")
    assert engine.get_var(d1.dialog_id, "billing") == "acct-7"
    store = engine.store
    assert store.profile_size("total") == 2
    assert store.profile_values("user") == {"alice": 2}
    assert store.limit_set("user", "alice", 5) is None
    assert engine.release(d1.dialog_id, "bye") is not None
    assert engine.release(d2.dialog_id, "cancel") is not None
    assert store.profile_size("total") == 0
    assert store.stats()["ended"] == 2
    assert [r.reason for r in store.call_records()] == ["bye", "cancel"]
    assert store.ping()
    store.close()


def _wrong_password_is_clean(url: str, namespace: str, tmp_path: Path,
                             extra_env: dict[str, str] | None = None) -> None:
    """A proxy gets a fallback decision; the CLI a clear error; no password anywhere."""
    for on_error, admitted in (("admit", True), ("reject", False)):
        engine = _engine(url, namespace, on_error)
        d = engine.admit(_call(99))
        assert d.fallback and d.admitted is admitted
        assert d.error
        _clean(d.error)
        _clean(repr(d.as_dict()))
        with pytest.raises(StoreError) as e:
            engine.store.stats()
        _clean(str(e.value))
        assert engine.store.ping() is False
    env = {"POLICER_POLICY": str(policy_copy(tmp_path, namespace)), **(extra_env or {})}
    for args in (("admit", "--from", "alice", "--to", "5551234", "--json"),
                 ("admit", "--from", "alice", "--to", "112"),
                 ("stats", "--json"),
                 ("profile", "size", "total")):
        proc = run_cli(*args, "--redis", url, env=env)
        assert proc.returncode == 3, (args, proc.stdout, proc.stderr)
        assert "store error" in proc.stderr and "Traceback" not in proc.stderr
        _clean(proc.stdout + proc.stderr)
    # the same through POLICER_REDIS_URL
    proc = run_cli("stats", "--json", env={**env, "POLICER_REDIS_URL": url})
    assert proc.returncode == 3
    _clean(proc.stdout + proc.stderr)


# ----------------------------------------------------------------------------- AUTH + ACL


@pytest.fixture(scope="module")
def auth_redis() -> Iterator[RedisServer]:
    """A Redis whose default user needs ADMIN_PW, with an ACL user ``policer``."""
    server = RedisServer().start()  # PING answers before the password is set
    try:
        c = redis.Redis(host=server.host, port=server.port, decode_responses=True)
        c.execute_command("ACL", "SETUSER", "policer", *ACL_RULES, f">{POLICER_PW}")
        c.config_set("requirepass", ADMIN_PW)
        c.close()
        yield server
    finally:
        server.stop()


def test_requirepass(auth_redis: RedisServer, namespace: str) -> None:
    url = f"redis://:{quote(ADMIN_PW, safe='')}@127.0.0.1:{auth_redis.port}/0"
    _admit_and_release(url, namespace)
    # and no password: refused
    d = _engine(f"redis://127.0.0.1:{auth_redis.port}/0", namespace).admit(_call(5))
    assert d.fallback and "auth" in d.error.lower()


def test_requirepass_wrong_password(auth_redis: RedisServer, namespace: str,
                                    tmp_path: Path) -> None:
    _wrong_password_is_clean(f"redis://:{WRONG_PW}@127.0.0.1:{auth_redis.port}/0",
                             namespace, tmp_path)


def test_acl_user(auth_redis: RedisServer, namespace: str, tmp_path: Path) -> None:
    url = f"redis://policer:{quote(POLICER_PW, safe='')}@127.0.0.1:{auth_redis.port}/0"
    _admit_and_release(url, namespace)
    # the command line through the ACL user
    env = {"POLICER_POLICY": str(_policy_file(tmp_path, namespace))}
    proc = run_cli("admit", "--from", "bob", "--to", "5551234", "--call-id", "cli-1",
                   "--json", "--redis", url, env=env)
    assert proc.returncode == 0, proc.stderr
    _clean(proc.stdout + proc.stderr)
    proc = run_cli("stats", "--json", "--redis", url, env=env)
    assert proc.returncode == 0 and '"active": 1' in proc.stdout
    _clean(proc.stdout + proc.stderr)
    # the user's rights end at its own keys and harmless commands
    c = redis.Redis(host="127.0.0.1", port=auth_redis.port, username="policer",
                    password=POLICER_PW, decode_responses=True)
    assert c.ping()
    for forbidden in (lambda: c.get("other:key"), lambda: c.set("session:1", "x"),
                      c.flushall, lambda: c.config_get("*"), lambda: c.keys("*"),
                      c.script_flush, c.acl_list, lambda: c.execute_command("FUNCTION", "LIST")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    c.close()


def test_acl_user_wrong_password(auth_redis: RedisServer, namespace: str,
                                 tmp_path: Path) -> None:
    _wrong_password_is_clean(f"redis://policer:{WRONG_PW}@127.0.0.1:{auth_redis.port}/0",
                             namespace, tmp_path)


def test_a_disabled_acl_user_is_a_store_error(auth_redis: RedisServer, namespace: str) -> None:
    admin = redis.Redis(host="127.0.0.1", port=auth_redis.port, password=ADMIN_PW)
    admin.execute_command("ACL", "SETUSER", "policer-off", "off", f">{POLICER_PW}")
    admin.close()
    url = f"redis://policer-off:{quote(POLICER_PW, safe='')}@127.0.0.1:{auth_redis.port}/0"
    d = _engine(url, namespace, "reject").admit(_call(1))
    assert d.fallback and not d.admitted
    _clean(d.error)


# ----------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRedisServer]:
    certs = make_certificates(tmp_path_factory.mktemp("certs"))
    server = TLSRedisServer(certs, extra_args=("--requirepass", ADMIN_PW))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_tls(tls_redis: TLSRedisServer, namespace: str, tmp_path: Path) -> None:
    url = tls_url(tls_redis, ADMIN_PW)
    _admit_and_release(url, namespace)
    store = open_store(url, namespace)
    assert isinstance(store, RedisStore)
    conn = store.client.connection_pool.get_connection()
    # really TLS (the server takes nothing else: the admit above went through it)
    assert isinstance(conn, SSLConnection)
    store.client.connection_pool.release(conn)
    store.close()
    env = {"POLICER_POLICY": str(_policy_file(tmp_path, namespace))}
    proc = run_cli("admit", "--from", "carol", "--to", "0049301", "--json", "--redis", url,
                   env=env)
    assert proc.returncode == 0, proc.stderr
    _clean(proc.stdout + proc.stderr)
    # plain TCP to a TLS port is no store
    d = _engine(f"redis://:{ADMIN_PW}@127.0.0.1:{tls_redis.port}/0", namespace).admit(_call(7))
    assert d.fallback
    _clean(d.error)


def test_policer_serve_over_tls(tls_redis: TLSRedisServer, namespace: str,
                                tmp_path: Path) -> None:
    """The decision service's admits take the same pipelined path over TLS: a
    connection of the worker's own, opened with the URL's certificates and password."""
    env = {"POLICER_REDIS_URL": tls_url(tls_redis, ADMIN_PW),
           "POLICER_POLICY": str(_policy_file(tmp_path, namespace))}
    s = Serve(tmp_path, env)
    try:
        answers = [s.post("/v1/admit", serve_body(f"tls-{i}", number="5551234"))[1]
                   for i in range(3)]
        assert [(a["admitted"], a["fallback"]) for a in answers] == [
            (True, False), (True, False), (False, False)]
        assert s.post("/v1/release", {"dialog_id": answers[0]["dialog_id"]})[1]["ok"]
    finally:
        s.stop()
    opened = [json.loads(line) for line in s.log.read_text().splitlines()
              if "admit_pipeline_open" in line]
    assert opened and opened[0]["tls"] is True
    _clean(s.log.read_text())


def test_tls_wrong_password(tls_redis: TLSRedisServer, namespace: str, tmp_path: Path) -> None:
    _wrong_password_is_clean(tls_url(tls_redis, WRONG_PW), namespace, tmp_path)


@pytest.mark.parametrize("change", [
    {"ssl_certfile": "", "ssl_keyfile": ""},  # no client certificate
    {"ssl_ca_certs": ""},                     # the server's CA not trusted
])
def test_tls_refused(tls_redis: TLSRedisServer, namespace: str, change: dict[str, str]) -> None:
    url = tls_url(tls_redis, ADMIN_PW, **change)
    d = _engine(url, namespace, "reject").admit(_call(8))
    assert d.fallback and not d.admitted
    _clean(d.error)


# ----------------------------------------------------------------------------- URL forms


@pytest.mark.parametrize("url", [
    "redis+sentinel://policer:{pw}@127.0.0.1:{port},127.0.0.1:{port2}/policer/0"
    "?sentinel_password={pw2}",
    "redis+cluster://policer:{pw}@127.0.0.1:{port}",
    "rediss://policer:{pw}@127.0.0.1:{port}/0?ssl_cert_reqs=none",
    "redis://policer:{pw}@127.0.0.1:{port}/0?password={pw2}",
])
def test_nothing_listening_no_url_form_shows_a_password(url: str, namespace: str,
                                                        tmp_path: Path) -> None:
    url = url.format(pw=quote(POLICER_PW, safe=""), pw2=ADMIN_PW, port=free_port(),
                     port2=free_port())
    engine = _engine(url, namespace)
    d = engine.admit(_call(1))
    assert d.fallback
    _clean(d.error)
    env = {"POLICER_POLICY": str(policy_copy(tmp_path, namespace, EXAMPLE))}
    for args in (("stats", "--json"), ("admit", "--to", "123", "--json")):
        t0 = time.monotonic()
        proc = run_cli(*args, "--redis", url, env=env)
        assert proc.returncode == 3, (args, proc.stderr)
        assert time.monotonic() - t0 < 30
        _clean(proc.stdout + proc.stderr)
    with contextlib.suppress(StoreError):
        engine.store.close()


@pytest.mark.parametrize(("text", "shown"), [
    ("redis://policer:s3cret@h:6379/0", "redis://policer:***@h:6379/0"),
    ("redis://s3cret@h:6379", "redis://***@h:6379"),  # a password alone
    ("rediss://:s3cret@h", "rediss://:***@h"),
    ("redis+sentinel://u:s3cret@a:1,b:2/svc?sentinel_password=s3cret&x=1",
     "redis+sentinel://u:***@a:1,b:2/svc?sentinel_password=***&x=1"),
    ("Connection<host=h,port=1,password=s3cret,db=0>",
     "Connection<host=h,port=1,password=***,db=0>"),
    ("no credentials here: redis://h:1/0", "no credentials here: redis://h:1/0"),
])
def test_one_redactor_hides_every_form_of_a_password(text: str, shown: str) -> None:
    """policer.log.redact: log lines, the store's errors, the cfg generator's messages."""
    from policer.log import redact

    assert redact(text) == shown
    assert redact(shown) == shown
