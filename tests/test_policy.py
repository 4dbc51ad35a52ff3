"""
Policies through the real daemon and the real clients: a minimum release
age (npm, pnpm, yarn berry and go see only versions old enough; a pinned
exemption installs; a version appears once it is old enough, without a
restart) and deny rules (the versions they name hidden and refused,
cached or not).
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import re
import time
from typing import Any, Iterator

import pytest

from .daemon import Daemon
from .gomodules import ModuleVersion, build_tree
from .npmpackages import CLIENTS, Package, RegistryFixture, pack
from .test_goproxy import go
from .test_npm import BERRY, npmrc, project, request, run
from .upstream import UpstreamFixture

DAY = 86400.0
PKG = "cc-policy-pkg"
PINNED = "cc-policy-pinned"
SOON = "cc-policy-soon"
DENIED = "cc-policy-denied"
#: Seconds after the start of the module until SOON@1.1.0 is old enough.
SOON_AFTER = 12.0

YOUNG = "was published"


def iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


PACKAGES = [
    Package(PKG, "1.0.0", {}),
    Package(PKG, "1.1.0", {}),
    Package(PKG, "1.2.0", {}),
    Package(PKG, "1.3.0-beta.1", {}),
    Package(PKG, "1.4.0", {}),
    Package(PINNED, "1.0.0", {}),
    Package(PINNED, "1.1.0", {}),
    Package(SOON, "1.0.0", {}),
    Package(SOON, "1.1.0", {}),
    Package(DENIED, "1.0.0", {}),
    Package(DENIED, "1.1.0", {}),
    Package(DENIED, "2.0.0", {}),
]
TAGS = {
    PKG: {"latest": "1.2.0", "next": "1.3.0-beta.1"},
    PINNED: {"latest": "1.1.0"},
    SOON: {"latest": "1.1.0"},
    DENIED: {"latest": "2.0.0"},
}

CONFIG = f'''
[policy.min_age]
exempt = ["{PINNED}@1.1.0", "{DENIED}", "example.com/exempt*"]

[[policy.deny]]
protocol = "npm"
name = "cc-policy-den*"
versions = ">=1.1.0 <2.0.0"
reason = "malicious release"

[[policy.deny]]
protocol = "go"
name = "example.com/denied"
versions = "v1.1.0"
reason = "it deletes your home directory"
'''


@pytest.fixture(scope="module")
def npm_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RegistryFixture, Daemon, Any]]:
    work = tmp_path_factory.mktemp("policy")
    packed = [(package, pack(package, str(work / "packages"))) for package in PACKAGES]
    registry = RegistryFixture(str(work / "registry"), packed, dist_tags=TAGS, abbreviated=True)
    now = time.time()
    times = {
        PKG: {"1.0.0": now - 30 * DAY, "1.1.0": now - 10 * DAY, "1.2.0": now - DAY, "1.3.0-beta.1": now - DAY,
              "1.4.0": None},
        PINNED: {"1.0.0": now - 30 * DAY, "1.1.0": now - DAY},
        SOON: {"1.0.0": now - 30 * DAY, "1.1.0": now - 7 * DAY + SOON_AFTER},
        DENIED: {"1.0.0": now - 30 * DAY, "1.1.0": now - 20 * DAY, "2.0.0": now - DAY},
    }
    for name, versions in times.items():
        document = registry.packuments[name]
        for version, published in versions.items():
            if published is None:
                document["time"].pop(version, None)  # a version without a time
            else:
                document["time"][version] = iso(published)
        document["time"]["modified"] = iso(now - DAY)
        registry.publish(name)
    config = work / "contentcache.toml"
    config.write_text(CONFIG)
    daemon = Daemon(str(work / "storage"), [
        "--npm-upstream", registry.url, "--npm-min-age", "7d", "--npm-metadata-ttl", "1s", "--config", str(config),
    ])
    try:
        yield registry, daemon, work
    finally:
        daemon.stop()
        registry.stop()


def installed_version(app: str, name: str) -> str:
    with open(os.path.join(app, "node_modules", name, "package.json")) as f:
        version: str = json.load(f)["version"]
    return version


def packument(daemon: Daemon, name: str, abbreviated: bool = False) -> dict[str, Any]:
    accept = {"Accept": "application/vnd.npm.install-v1+json"} if abbreviated else {}
    status, _, body = request(daemon.url, f"/npm/{name}", headers=accept)
    assert status == 200, body
    document: dict[str, Any] = json.loads(body)
    return document


def test_npm_sees_only_versions_old_enough(tmp_path: Any, npm_setup: Any) -> None:
    registry, daemon, _ = npm_setup
    home = str(tmp_path / "home")
    npmrc(home, f"{daemon.url}/npm/")
    # Both variants, their times and their tags: the example.
    for abbreviated in (False, True):
        document = packument(daemon, PKG, abbreviated)
        assert sorted(document["versions"]) == ["1.0.0", "1.1.0"], abbreviated
        assert document["dist-tags"] == {"latest": "1.1.0", "next": "1.1.0"}
    assert set(packument(daemon, PKG)["time"]) == {"created", "modified", "1.0.0", "1.1.0"}

    app = project(str(tmp_path / "app"), {})
    result = run(["npm", "install", PKG], app, home)
    assert result.returncode == 0, result.stderr
    assert installed_version(app, PKG) == "1.1.0"

    result = run(["npm", "view", PKG, "versions", "--json"], app, home)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["1.0.0", "1.1.0"]

    young = run(["npm", "install", f"{PKG}@1.2.0"], str(tmp_path / "app"), home)
    assert young.returncode != 0
    assert "No matching version found" in young.stderr, young.stderr

    # A lockfile made before the policy pins a young version: npm ci
    # fetches its tarball and shows the 403 with its sentence.
    status, headers, body = request(daemon.url, f"/npm/{PKG}/-/{PKG}-1.2.0.tgz")
    assert status == 403 and headers["content-type"] == "application/json"
    reason = json.loads(body)["error"]
    assert reason.startswith(f"{PKG}@1.2.0 was published ") and "this cache makes it available from" in reason
    pinned = project(str(tmp_path / "pinned"), {PKG: "1.2.0"})
    integrity = registry.packuments[PKG]["versions"]["1.2.0"]["dist"]["integrity"]
    with open(os.path.join(pinned, "package-lock.json"), "w") as f:
        json.dump({
            "name": "cc-test-project", "version": "1.0.0", "lockfileVersion": 3, "requires": True,
            "packages": {
                "": {"name": "cc-test-project", "version": "1.0.0", "dependencies": {PKG: "1.2.0"}},
                f"node_modules/{PKG}": {
                    "version": "1.2.0", "resolved": f"{daemon.url}/npm/{PKG}/-/{PKG}-1.2.0.tgz",
                    "integrity": integrity, "license": "MIT",
                },
            },
        }, f)
    ci = run(["npm", "ci"], pinned, home)
    assert ci.returncode != 0
    assert "403" in ci.stderr and reason in ci.stderr, ci.stderr

    # Without a time, fail closed; the prerelease, too young.
    status, _, body = request(daemon.url, f"/npm/{PKG}/-/{PKG}-1.3.0-beta.1.tgz")
    assert status == 403 and YOUNG in json.loads(body)["error"]
    status, _, body = request(daemon.url, f"/npm/{PKG}/-/{PKG}-1.4.0.tgz")
    assert status == 403 and "has no publish time" in json.loads(body)["error"]
    status, _, _ = request(daemon.url, f"/npm/{PKG}/-/{PKG}-1.1.0.tgz")
    assert status == 200
    assert "Traceback" not in daemon.log()


def test_an_exempt_pin_installs(tmp_path: Any, npm_setup: Any) -> None:
    _, daemon, _ = npm_setup
    home = str(tmp_path / "home")
    npmrc(home, f"{daemon.url}/npm/")
    assert sorted(packument(daemon, PINNED)["versions"]) == ["1.0.0", "1.1.0"]
    app = project(str(tmp_path / "app"), {PINNED: "1.1.0"})
    result = run(["npm", "install"], app, home)
    assert result.returncode == 0, result.stderr
    assert installed_version(app, PINNED) == "1.1.0"


def test_pnpm_and_yarn_berry_see_the_same(tmp_path: Any, npm_setup: Any) -> None:
    _, daemon, _ = npm_setup
    base = f"{daemon.url}/npm/"
    pnpm = os.path.join(CLIENTS, "pnpm")
    for client in ("pnpm", "yarn-berry"):
        home = str(tmp_path / client / "home")
        npmrc(home, base)
        app = project(str(tmp_path / client / "app"), {})
        env = {"YARN_ENABLE_IMMUTABLE_INSTALLS": "false", "npm_config_store_dir": os.path.join(home, "pnpm-store")}
        if client == "pnpm":
            add = [pnpm, "add", "--reporter=append-only"]
        else:
            with open(os.path.join(app, ".yarnrc.yml"), "w") as f:
                f.write(f'npmRegistryServer: "{base}"\nunsafeHttpWhitelist: ["127.0.0.1"]\n'
                        "nodeLinker: node-modules\nenableGlobalCache: false\nenableTelemetry: false\n")
            add = ["node", BERRY, "add"]
        result = run([*add, PKG], app, home, **env)
        assert result.returncode == 0, f"{client}: {result.stdout}\n{result.stderr}"
        assert installed_version(app, PKG) == "1.1.0", client
        young = run([*add, f"{PKG}@1.2.0"], app, home, **env)
        assert young.returncode != 0, client
        output = young.stdout + young.stderr
        assert "1.2.0" in output and ("No matching version" in output or "No candidates found" in output
                                     or "ERR_PNPM_NO_MATCHING_VERSION" in output), f"{client}: {output}"


def test_a_version_appears_once_old_enough_without_a_restart(npm_setup: Any) -> None:
    registry, daemon, _ = npm_setup
    # By the passing of time: nothing upstream changes.
    started = time.time()
    assert sorted(packument(daemon, SOON)["versions"]) == ["1.0.0"]
    assert packument(daemon, SOON)["dist-tags"] == {"latest": "1.0.0"}
    deadline = started + SOON_AFTER + 30
    while sorted(packument(daemon, SOON, abbreviated=True)["versions"]) != ["1.0.0", "1.1.0"]:
        assert time.time() < deadline, "1.1.0 never appeared"
        time.sleep(0.5)
    assert packument(daemon, SOON)["dist-tags"] == {"latest": "1.1.0"}
    assert request(daemon.url, f"/npm/{SOON}/-/{SOON}-1.1.0.tgz")[0] == 200

    # By upstream's time rewritten (republished 9 days earlier).
    document = registry.packuments[PKG]
    document["time"]["1.2.0"] = iso(time.time() - 9 * DAY)
    registry.publish(PKG)
    deadline = time.time() + 30
    while "1.2.0" not in packument(daemon, PKG, abbreviated=True)["versions"]:
        assert time.time() < deadline, "1.2.0 never appeared"
        time.sleep(0.5)
    assert packument(daemon, PKG)["dist-tags"]["latest"] == "1.2.0"
    assert request(daemon.url, f"/npm/{PKG}/-/{PKG}-1.2.0.tgz")[0] == 200


def test_npm_deny_rule_hides_and_refuses_exactly_its_versions(tmp_path: Any, npm_setup: Any) -> None:
    registry, daemon, work = npm_setup
    # Cached before the rule: a daemon without it fetches everything.
    storage = str(tmp_path / "storage")
    open_daemon = Daemon(storage, ["--npm-upstream", registry.url])
    try:
        for version in ("1.0.0", "1.1.0", "2.0.0"):
            assert request(open_daemon.url, f"/npm/{DENIED}/-/{DENIED}-{version}.tgz")[0] == 200
        for accept in ("application/json", "application/vnd.npm.install-v1+json"):
            for encoding in ("identity", "gzip"):
                status, _, body = request(open_daemon.url, f"/npm/{DENIED}",
                                          headers={"Accept": accept, "Accept-Encoding": encoding})
                assert status == 200 and b"1.1.0" in (gzip.decompress(body) if encoding == "gzip" else body)
    finally:
        open_daemon.stop()
    ruled = Daemon(storage, ["--npm-upstream", registry.url, "--config", str(work / "contentcache.toml")])
    try:
        for abbreviated in (False, True):
            document = packument(ruled, DENIED, abbreviated)
            assert sorted(document["versions"]) == ["1.0.0", "2.0.0"]
            assert document["dist-tags"] == {"latest": "2.0.0"}
        status, _, body = request(ruled.url, f"/npm/{DENIED}", headers={"Accept-Encoding": "gzip"})
        assert status == 200 and sorted(json.loads(gzip.decompress(body))["versions"]) == ["1.0.0", "2.0.0"]
        assert "npm policy: minimum release age none, 3 exemptions, 1 deny rules" in ruled.log()
        status, headers, body = request(ruled.url, f"/npm/{DENIED}/-/{DENIED}-1.1.0.tgz")
        assert status == 403 and headers["content-type"] == "application/json"
        assert json.loads(body) == {"error": f"{DENIED}@1.1.0 is denied by this cache's policy: malicious release"}
        for version in ("1.0.0", "2.0.0"):
            status, headers, _ = request(ruled.url, f"/npm/{DENIED}/-/{DENIED}-{version}.tgz")
            assert status == 200 and headers["x-cache"] == "HIT"
        status, _, body = request(ruled.url, f"/npm/-/package/{DENIED}/dist-tags")
        assert status == 200 and json.loads(body) == {"latest": "2.0.0"}
        # The status page's view of the package says which is hidden.
        status, _, page = request(ruled.url, f"/-/ui/npm/{DENIED}")
        assert status == 200
        rows = dict(re.findall(r'<tr data-version="([^"]+)">(.*?)</tr>', page.decode()))
        assert sorted(rows) == ["1.0.0", "1.1.0", "2.0.0"]
        assert "hidden: cc-policy-denied@1.1.0 is denied by this cache&#x27;s policy: malicious release" in rows["1.1.0"]
        assert "hidden" not in rows["1.0.0"] + rows["2.0.0"]
        metrics = request(ruled.url, "/metrics")[2].decode()
        assert 'contentcache_policy_refusals_total{protocol="npm",rule="deny"} 1.0' in metrics
        assert "Traceback" not in ruled.log()
    finally:
        ruled.stop()


# Go.

YOUNG_MODULE = "example.com/young"
SOON_MODULE = "example.com/soon"
DENIED_MODULE = "example.com/denied"


def go_modules(now: float) -> list[ModuleVersion]:
    def module(path: str, version: str, published: float) -> ModuleVersion:
        files = {"go.mod": f"module {path}\n\ngo 1.19\n", "m.go": f'package m\n\nconst V = "{version}"\n'}
        stamp = datetime.datetime.fromtimestamp(published, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return ModuleVersion(path, version, files, time=stamp)

    return [
        module(YOUNG_MODULE, "v1.0.0", now - 30 * DAY),
        module(YOUNG_MODULE, "v1.1.0", now - 20 * DAY),
        module(YOUNG_MODULE, "v1.2.0", now - DAY),  # yesterday: the newest
        module(SOON_MODULE, "v1.0.0", now - 30 * DAY),
        module(SOON_MODULE, "v1.1.0", now - 7 * DAY + SOON_AFTER),
        module(DENIED_MODULE, "v1.0.0", now - 30 * DAY),
        module(DENIED_MODULE, "v1.1.0", now - 30 * DAY),
        module(DENIED_MODULE, "v1.2.0", now - 30 * DAY),
    ]


@pytest.fixture(scope="module")
def go_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UpstreamFixture, Daemon]]:
    work = tmp_path_factory.mktemp("gopolicy")
    upstream = UpstreamFixture(build_tree(str(work / "tree"), go_modules(time.time())))
    config = work / "contentcache.toml"
    config.write_text(CONFIG)
    daemon = Daemon(str(work / "storage"), [
        "--go-upstream", upstream.url, "--go-sumdb", "off", "--go-min-age", "7d", "--config", str(config),
    ])
    try:
        yield upstream, daemon
    finally:
        daemon.stop()
        upstream.stop()


def go_project(tmp_path: Any) -> str:
    app = tmp_path / "app"
    app.mkdir()
    (app / "go.mod").write_text("module example.com/app\n\ngo 1.19\n")
    return str(app)


def test_go_sees_only_versions_old_enough(tmp_path: Any, go_setup: Any) -> None:
    _, daemon = go_setup
    home, app = str(tmp_path / "home"), go_project(tmp_path)
    proxy = {"GOPROXY": f"{daemon.url}/goproxy", "GOSUMDB": "off"}
    listed = go(home, "list", "-m", "-versions", YOUNG_MODULE, cwd=app, **proxy)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [YOUNG_MODULE, "v1.0.0", "v1.1.0"]

    got = go(home, "get", f"{YOUNG_MODULE}@latest", cwd=app, **proxy)
    assert got.returncode == 0, got.stderr
    assert f"require {YOUNG_MODULE} v1.1.0" in open(os.path.join(app, "go.mod")).read()

    young = go(home, "get", f"{YOUNG_MODULE}@v1.2.0", cwd=app, **{**proxy, "GOPROXY": f"{daemon.url}/goproxy,direct"})
    assert young.returncode != 0
    assert "403 Forbidden" in young.stderr and f"{YOUNG_MODULE}@v1.2.0 was published" in young.stderr, young.stderr

    status, _, body = request(daemon.url, f"/goproxy/{YOUNG_MODULE}/@latest")
    assert status == 200 and json.loads(body)["Version"] == "v1.1.0"
    for ext in ("info", "mod", "zip"):
        status, headers, body = request(daemon.url, f"/goproxy/{YOUNG_MODULE}/@v/v1.2.0.{ext}")
        assert status == 403 and headers["content-type"].startswith("text/plain"), ext
        assert body.decode().count("\n") == 1 and YOUNG in body.decode()


def test_go_version_appears_once_old_enough(go_setup: Any) -> None:
    _, daemon = go_setup
    started = time.time()
    assert request(daemon.url, f"/goproxy/{SOON_MODULE}/@v/list")[2].split() == [b"v1.0.0"]
    assert request(daemon.url, f"/goproxy/{SOON_MODULE}/@v/v1.1.0.zip")[0] == 403
    deadline = started + SOON_AFTER + 30
    while request(daemon.url, f"/goproxy/{SOON_MODULE}/@v/list")[2].split() != [b"v1.0.0", b"v1.1.0"]:
        assert time.time() < deadline, "v1.1.0 never appeared"
        time.sleep(0.5)
    assert json.loads(request(daemon.url, f"/goproxy/{SOON_MODULE}/@latest")[2])["Version"] == "v1.1.0"
    assert request(daemon.url, f"/goproxy/{SOON_MODULE}/@v/v1.1.0.zip")[0] == 200


def test_go_deny_rule_hides_and_refuses_exactly_its_versions(tmp_path: Any, go_setup: Any) -> None:
    upstream, daemon = go_setup
    status, _, body = request(daemon.url, f"/goproxy/{DENIED_MODULE}/@v/list")
    assert status == 200 and body.split() == [b"v1.0.0", b"v1.2.0"]
    status, _, body = request(daemon.url, f"/goproxy/{DENIED_MODULE}/@v/v1.1.0.zip")
    assert status == 403
    assert body == f"{DENIED_MODULE}@v1.1.0 is denied by this cache's policy: it deletes your home directory\n".encode()
    for version in ("v1.0.0", "v1.2.0"):
        assert request(daemon.url, f"/goproxy/{DENIED_MODULE}/@v/{version}.zip")[0] == 200
    # Never fetched: refused before upstream is asked.
    assert upstream.count(f"/{DENIED_MODULE}/@v/v1.1.0.zip") == 0


def test_go_upstream_answers_the_policy_cannot_read(go_setup: Any) -> None:
    upstream, daemon = go_setup
    # An .info and an @latest that are not JSON: the policy cannot tell
    # their time, so the version is left out and refused, and @latest is
    # upstream's failure (502), each in one line; never a 500.
    module = "example.com/garbled"
    upstream.override[f"/{module}/@v/list"] = (200, b"v1.0.0\n")
    upstream.override[f"/{module}/@v/v1.0.0.info"] = (200, b"<html>not json</html>")
    upstream.override[f"/{module}/@latest"] = (200, b"<html>not json</html>")
    status, _, body = request(daemon.url, f"/goproxy/{module}/@v/list")
    assert (status, body) == (200, b"")
    status, _, body = request(daemon.url, f"/goproxy/{module}/@v/v1.0.0.zip")
    assert status == 403 and body == f"{module}@v1.0.0 has no publish time, and this cache serves only versions " \
        "published at least 7d ago (a pin in [policy.min_age] exempt makes it available)\n".encode()
    status, headers, body = request(daemon.url, f"/goproxy/{module}/@latest")
    assert status == 502 and headers["content-type"].startswith("text/plain")
    assert body == f"upstream failure: {module}@latest: upstream's answer is not JSON\n".encode()
    assert "Traceback" not in daemon.log()
