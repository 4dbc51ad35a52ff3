"""
Client tokens: created, listed and revoked with the admin command, stored
as digests, presented as Bearer or Basic, and the daemon's --access.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest
from twisted.internet.task import Clock

from contentcache.auth import Tokens, digest, presented
from contentcache.index import SQLiteIndex

from .conftest import resolve
from .daemon import Daemon, concurrent_gets
from .gomodules import GREET, build_tree, modules
from .npmpackages import PACKAGES, TOP, RegistryFixture, pack
from .test_npm import EXPECTED, check_installed, npmrc, project, run
from .upstream import UpstreamFixture

INFO = f"/goproxy/{GREET}/@v/v1.2.0.info"


def get(url: str, path: str, authorization: str | None = None) -> tuple[int, dict[str, list[str]], bytes]:
    import http.client

    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path, headers={"Authorization": authorization} if authorization else {})
        response = connection.getresponse()
        headers: dict[str, list[str]] = {}
        for k, v in response.getheaders():
            headers.setdefault(k.lower(), []).append(v)
        return response.status, headers, response.read()
    finally:
        connection.close()


def admin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "contentcache.cli", *args], capture_output=True, text=True,
                          timeout=60)


class FakeRequest:
    def __init__(self, authorization: bytes | None) -> None:
        self._authorization = authorization

    def getHeader(self, name: bytes) -> bytes | None:
        return self._authorization if name == b"authorization" else None


@pytest.mark.parametrize("header, token", [
    (None, None),
    (b"Bearer cc_abc", "cc_abc"),
    (b"bearer   cc_abc  ", "cc_abc"),
    (b"Basic " + base64.b64encode(b"anyone:cc_abc"), "cc_abc"),
    (b"Basic " + base64.b64encode(b"cc_abc"), None),  # no password
    (b"Basic not-base64!", None),
    (b"Digest username=x", None),
])
def test_a_token_is_presented_as_bearer_or_as_basics_password(header: bytes | None, token: str | None) -> None:
    assert presented(FakeRequest(header)) == token  # type: ignore[arg-type]


def test_a_revoked_token_is_forgotten_within_a_second(index: SQLiteIndex, clock: Clock) -> None:
    resolve(index.create_token("ci", digest("cc_secret")))
    tokens = Tokens(index, clock)
    assert resolve(tokens.name_of("cc_secret")) == "ci"
    assert resolve(tokens.name_of("cc_other")) is None
    resolve(index.revoke_token("ci"))
    clock.advance(0.5)
    assert resolve(tokens.name_of("cc_secret")) == "ci"  # what it learnt a moment ago
    clock.advance(0.6)
    assert resolve(tokens.name_of("cc_secret")) is None
    assert [r.name for r in resolve(index.tokens())] == []


def test_only_a_digest_of_a_token_is_kept(index: SQLiteIndex, storage: str) -> None:
    import sqlite3

    resolve(index.create_token("ci", digest("cc_secret-token-value")))
    resolve(index.close())
    db = sqlite3.connect(os.path.join(storage, "index.sqlite"))
    assert db.execute("SELECT name, digest FROM tokens").fetchall() == [("ci", digest("cc_secret-token-value"))]
    db.close()
    for name in os.listdir(storage):
        with open(os.path.join(storage, name), "rb") as f:
            assert b"cc_secret-token-value" not in f.read(), name


@pytest.fixture
def upstream(tmp_path: Any) -> Iterator[UpstreamFixture]:
    fixture = UpstreamFixture(build_tree(str(tmp_path / "proxy"), modules()))
    yield fixture
    fixture.stop()


def test_access_token_on_every_worker(tmp_path: Any, upstream: UpstreamFixture) -> None:
    storage = str(tmp_path / "storage")
    daemon = Daemon(storage, ["--access", "token", "--metrics-access", "token", "--workers", "2",
                              "--go-upstream", upstream.url, "--go-sumdb", "off"])
    try:
        created = admin("token", "create", "ci", "--storage", storage)
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()
        assert re.fullmatch(r"cc_[A-Za-z0-9_-]{43}", token) and "only time it is shown" in created.stderr
        assert admin("token", "create", "ci", "--storage", storage).returncode != 0  # one of each name

        status, headers, body = get(daemon.url, INFO)
        assert status == 401 and body.count(b"\n") == 1 and b"token" in body
        assert headers["www-authenticate"] == ['Bearer realm="contentcache"', 'Basic realm="contentcache"']
        assert get(daemon.url, INFO, "Bearer cc_madeup")[0] == 401
        assert upstream.count(f"/{GREET}/@v/v1.2.0.info") == 0  # nothing fetched for them
        assert get(daemon.url, INFO, f"Bearer {token}")[0] == 200
        basic = base64.b64encode(f"build:{token}".encode()).decode()
        assert get(daemon.url, INFO, f"Basic {basic}")[0] == 200
        assert get(daemon.url, "/health")[0] == 200  # always open
        assert get(daemon.url, "/metrics")[0] == 401
        text = get(daemon.url, "/metrics", f"Bearer {token}")[2].decode()
        assert re.search(r'^contentcache_auth_failures_total\{reason="missing"\} [1-9]', text, re.M)
        assert upstream.log and all("Authorization" not in h and "authorization" not in h
                                    for _, _, h in upstream.log)

        # Revoked: refused on both workers within 2 seconds.
        assert admin("token", "revoke", "ci", "--storage", storage).returncode == 0
        time.sleep(2)
        results = concurrent_gets(lambda: get(daemon.url, INFO, f"Bearer {token}")[::2], 20)
        assert {status for status, _ in results} == {401}
        listed = admin("token", "list", "--storage", storage, "--json")
        assert json.loads(listed.stdout) == []
        log = daemon.log()
        assert token not in log and basic not in log
        assert "authentication failed" in log and "Traceback" not in log
    finally:
        daemon.stop()


def test_npm_installs_with_its_token(tmp_path: Any) -> None:
    work = str(tmp_path / "packages")
    packed = [(package, pack(package, work)) for package in PACKAGES]
    registry = RegistryFixture(str(tmp_path / "registry"), packed)
    storage = str(tmp_path / "storage")
    daemon = Daemon(storage, ["--access", "token", "--npm-upstream", registry.url])
    try:
        token = admin("token", "create", "laptop", "--storage", storage).stdout.strip()
        home = str(tmp_path / "home")
        address = daemon.url.removeprefix("http:")
        app = project(str(tmp_path / "app"), {TOP: "^1.0.0"})
        npmrc(home, f"{daemon.url}/npm/")
        refused = run(["npm", "install"], app, home)
        assert refused.returncode != 0 and "401" in refused.stderr + refused.stdout
        npmrc(home, f"{daemon.url}/npm/", **{f"{address}/npm/:_authToken": token})
        result = run(["npm", "install"], app, home)
        assert result.returncode == 0, result.stderr
        check_installed(os.path.join(app, "node_modules"), packed, EXPECTED)
        assert all("authorization" not in {k.lower() for k in h} for _, _, h in registry.log)
        assert token not in daemon.log()
        listed = admin("token", "list", "--storage", storage)
        assert listed.stdout.startswith("laptop  created ")
    finally:
        daemon.stop()
        registry.stop()
