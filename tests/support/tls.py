"""TLS for the tests' Redis: a private CA and certificates made with ``openssl`` in a
temporary directory, a ``redis-server`` that takes TLS only (client certificates
required), and the ``rediss://`` URL that reaches it."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from lab.redis_server import RedisServer


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(d: Path) -> dict[str, Path]:
    """A private CA, a server certificate for 127.0.0.1/localhost and a client one."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the TLS tests")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=policer test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, usage, alt in (("server", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
                             ("client", "clientAuth", "DNS:policer-client")):
        (d / f"{name}.ext").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyAgreement\n"
            f"extendedKeyUsage={usage}\n"
            f"subjectAltName={alt}\n"
            "authorityKeyIdentifier=keyid\n"
            "subjectKeyIdentifier=hash\n")
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=policer {name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key", "client.crt",
                               "client.key")}


class TLSRedisServer(RedisServer):
    """A redis-server that listens on a TLS port only (``--port 0``) and asks
    clients for a certificate signed by the CA (``tls-auth-clients yes``)."""

    def __init__(self, certs: dict[str, Path], extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(extra_args=[
            "--port", "0",
            "--tls-port", "0",  # replaced below
            "--tls-cert-file", str(certs["server.crt"]),
            "--tls-key-file", str(certs["server.key"]),
            "--tls-ca-cert-file", str(certs["ca.crt"]),
            "--tls-auth-clients", "yes",
            *extra_args,
        ])
        self.extra_args[3] = str(self.port)
        self.certs = certs

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.certs["ca.crt"]))
        ctx.load_cert_chain(str(self.certs["client.crt"]), str(self.certs["client.key"]))
        return ctx

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as raw, \
                    self.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False


def tls_url(server: TLSRedisServer, password: str, **extra: str) -> str:
    """A ``rediss://`` URL to ``server`` with the CA and the client certificate
    (``extra``: query arguments to add or, given empty, to leave out)."""
    c = server.certs
    args = {"ssl_ca_certs": str(c["ca.crt"]), "ssl_certfile": str(c["client.crt"]),
            "ssl_keyfile": str(c["client.key"]), "ssl_cert_reqs": "required", **extra}
    query = "&".join(f"{k}={v}" for k, v in args.items() if v)
    return f"rediss://:{quote(password, safe='')}@127.0.0.1:{server.port}/0?{query}"
