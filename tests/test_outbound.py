"""
Reaching upstreams: an https upstream with a certificate from a test CA
(refused until --ca-file trusts it), and outbound proxies (CONNECT for
https, forwarding for http) with NO_PROXY honoured.
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import threading
from socketserver import StreamRequestHandler, ThreadingTCPServer
from typing import Any, Iterator

import pytest

from contentcache.outbound import NoProxy

from .daemon import Daemon
from .gomodules import GREET, build_tree, modules
from .test_goproxy import request
from .tls import CertificateAuthority, make_ca
from .upstream import UpstreamFixture

INFO = f"/goproxy/{GREET}/@v/v1.2.0.info"


class HTTPSUpstream(UpstreamFixture):
    """
    The upstream fixture behind TLS with the test CA's certificate.
    """

    def __init__(self, root: str, ca: CertificateAuthority) -> None:
        super().__init__(root)
        self.server.socket = ca.server_context().wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.port}"


class ProxyFixture:
    """
    An outbound proxy: CONNECT tunnels, and plain http forwarded by its
    whole URL. It records what it was asked for.
    """

    def __init__(self) -> None:
        self.asked: list[str] = []
        fixture = self

        class Handler(StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline().decode("latin-1").strip()
                headers = []
                while (header := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                    headers.append(header.decode("latin-1").strip())
                method, target, _ = line.split(" ", 2)
                fixture.asked.append(f"{method} {target}")
                if method == "CONNECT":
                    host, port = target.rsplit(":", 1)
                    upstream = socket.create_connection((host, int(port)), timeout=10)
                    self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    self.wfile.flush()
                    self._pipe(upstream)
                    return
                # A forward proxy's request: the whole URL as its target.
                from urllib.parse import urlsplit

                parts = urlsplit(target)
                connection = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=10)
                keep = {k: v for k, v in (h.split(":", 1) for h in headers) if k.lower() not in ("proxy-connection",)}
                connection.request(method, parts.path or "/", headers={k: v.strip() for k, v in keep.items()})
                response = connection.getresponse()
                body = response.read()
                self.wfile.write(b"HTTP/1.1 %d %s\r\n" % (response.status, response.reason.encode()))
                for k, v in response.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding"):
                        self.wfile.write(f"{k}: {v}\r\n".encode("latin-1"))
                self.wfile.write(b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

            def _pipe(self, upstream: socket.socket) -> None:
                sockets = [self.connection, upstream]
                try:
                    while True:
                        readable, _, _ = select.select(sockets, [], [], 10)
                        if not readable:
                            return
                        for s in readable:
                            data = s.recv(65536)
                            if not data:
                                return
                            (upstream if s is self.connection else self.connection).sendall(data)
                finally:
                    upstream.close()

        ThreadingTCPServer.allow_reuse_address = True
        self.server = ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ca(tmp_path: Any) -> CertificateAuthority:
    return make_ca(str(tmp_path / "ca"))


@pytest.fixture
def https_upstream(tmp_path: Any, ca: CertificateAuthority) -> Iterator[HTTPSUpstream]:
    fixture = HTTPSUpstream(build_tree(str(tmp_path / "proxy"), modules()), ca)
    yield fixture
    fixture.stop()


@pytest.fixture
def proxy() -> Iterator[ProxyFixture]:
    fixture = ProxyFixture()
    yield fixture
    fixture.stop()


def start(tmp_path: Any, name: str, upstream: str, *extra: str, env: dict[str, str] | None = None) -> Daemon:
    return Daemon(str(tmp_path / name), ["--go-upstream", upstream, "--go-sumdb", "off", *extra], env=env)


def test_an_upstream_certificate_is_trusted_only_with_its_ca(
    tmp_path: Any, https_upstream: HTTPSUpstream, ca: CertificateAuthority
) -> None:
    daemon = start(tmp_path, "untrusting", https_upstream.url)
    try:
        status, _, body = request(daemon.url, INFO)
        assert status == 502 and body.startswith(b"upstream failure: ") and body.count(b"\n") == 1, body
        assert "Traceback" not in daemon.log()
    finally:
        daemon.stop()
    daemon = start(tmp_path, "trusting", https_upstream.url, "--ca-file", ca.ca_file)
    try:
        status, headers, _ = request(daemon.url, INFO)
        assert (status, headers["x-cache"]) == (200, "MISS")
    finally:
        daemon.stop()


def test_https_goes_through_the_proxys_tunnel_unless_no_proxy_says(
    tmp_path: Any, https_upstream: HTTPSUpstream, ca: CertificateAuthority, proxy: ProxyFixture
) -> None:
    target = f"127.0.0.1:{https_upstream.port}"
    daemon = start(tmp_path, "proxied", https_upstream.url, "--ca-file", ca.ca_file,
                   env={"HTTPS_PROXY": proxy.url, "NO_PROXY": "example.invalid"})
    try:
        status, headers, _ = request(daemon.url, INFO)
        assert (status, headers["x-cache"]) == (200, "MISS")
        assert proxy.asked == [f"CONNECT {target}"]
    finally:
        daemon.stop()
    daemon = start(tmp_path, "bypassing", https_upstream.url, "--ca-file", ca.ca_file,
                   env={"HTTPS_PROXY": proxy.url, "NO_PROXY": "localhost,127.0.0.1"})
    try:
        assert request(daemon.url, INFO)[0] == 200
        assert proxy.asked == [f"CONNECT {target}"]  # nothing more
    finally:
        daemon.stop()


def test_plain_http_is_forwarded_by_the_proxy(tmp_path: Any, proxy: ProxyFixture) -> None:
    upstream = UpstreamFixture(build_tree(str(tmp_path / "plain"), modules()))
    try:
        # Lower case, as curl reads it (an upper-case HTTP_PROXY is what a
        # CGI request can set, and curl ignores it).
        daemon = start(tmp_path, "forwarded", upstream.url, env={"http_proxy": proxy.url})
        try:
            status, headers, _ = request(daemon.url, INFO)
            assert (status, headers["x-cache"]) == (200, "MISS")
            assert proxy.asked == [f"GET {upstream.url}/{GREET}/@v/v1.2.0.info"]
        finally:
            daemon.stop()
    finally:
        upstream.stop()


def test_ssl_cert_file_adds_to_the_systems_roots(ca: CertificateAuthority) -> None:
    from OpenSSL import SSL, crypto

    from contentcache.outbound import SYSTEM_BUNDLES, Outbound, SystemAnd, load_roots

    bundle = next(b for b in SYSTEM_BUNDLES if os.path.exists(b))
    system_root = load_roots([bundle])[0]
    with open(ca.cert_file, "rb") as f:
        ours = crypto.load_certificate(crypto.FILETYPE_PEM, f.read())

    def trusted(certificate: crypto.X509, environ: dict[str, str], extra: list[crypto.X509]) -> bool:
        saved = {k: os.environ.get(k) for k in ("SSL_CERT_FILE",)}
        os.environ.update(environ)  # OpenSSL reads it from the process
        try:
            context = SSL.Context(SSL.TLS_METHOD)
            SystemAnd(extra)._addCACertsToContext(context)
            crypto.X509StoreContext(context.get_cert_store(), certificate).verify_certificate()
            return True
        except crypto.X509StoreContextError:
            return False
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    assert trusted(system_root, {}, [])
    assert not trusted(ours, {}, [])
    # SSL_CERT_FILE adds the test CA; the system's roots stay.
    outbound = Outbound.from_settings([], {"SSL_CERT_FILE": ca.ca_file})
    assert trusted(ours, {"SSL_CERT_FILE": ca.ca_file}, list(outbound.extra_roots))
    assert trusted(system_root, {"SSL_CERT_FILE": ca.ca_file}, list(outbound.extra_roots))


@pytest.mark.parametrize("no_proxy, host, port, bypassed", [
    ("", "example.com", 443, False),
    ("*", "example.com", 443, True),
    ("foo, *", "example.com", 443, False),  # "*" is a wildcard only alone
    ("foo example.com", "example.com", 443, True),  # spaces separate too
    ("example.com", "example.com", 443, True),
    ("example.com", "registry.example.com", 443, True),
    (".example.com", "registry.example.com", 443, True),
    ("example.com", "notexample.com", 443, False),
    ("example.com:8443", "example.com", 443, False),
    ("example.com:8443", "example.com", 8443, True),
    ("10.0.0.0/8, 127.0.0.1", "10.1.2.3", 80, True),
    ("10.0.0.0/8", "11.1.2.3", 80, False),
    ("[::1]", "::1", 80, True),
])
def test_no_proxy_reads_as_curl_reads_it(no_proxy: str, host: str, port: int, bypassed: bool) -> None:
    assert NoProxy.parse(no_proxy).bypasses(host, port) is bypassed
