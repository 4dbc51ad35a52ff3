"""
contentcache warm: a running cache filled from lockfiles (package-lock.json,
go.sum, go.mod), checked against their hashes, then serving the real
clients with every upstream gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any, Iterator

import pytest

from .daemon import Daemon
from .gomodules import HELLO, build_tree, modules
from .npmpackages import PACKAGES, TOP, RegistryFixture, pack
from .test_goproxy import go
from .test_npm import EXPECTED, check_installed, npmrc, project, run
from .upstream import UpstreamFixture

NpmCaches = tuple[list[tuple[Any, dict[str, Any]]], RegistryFixture, Daemon, Daemon]


@pytest.fixture
def npm_caches(tmp_path: Any) -> Iterator[NpmCaches]:
    """
    The packed fixture packages, a registry serving them, and two caches
    in front of it: one to make lockfiles through, one to warm.
    """
    work = str(tmp_path / "packages")
    packed = [(package, pack(package, work)) for package in PACKAGES]
    registry = RegistryFixture(str(tmp_path / "registry"), packed)
    first = Daemon(str(tmp_path / "first"), ["--npm-upstream", registry.url])
    second = Daemon(str(tmp_path / "second"), ["--npm-upstream", registry.url])
    try:
        yield packed, registry, first, second
    finally:
        first.stop()
        second.stop()
        registry.stop()


def warm(url: str, *files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "contentcache.cli", "warm", "--url", url, "--jobs", "4", *files],
                          capture_output=True, text=True, timeout=300)


def test_warm_from_package_lock_then_npm_ci_offline(tmp_path: Any, npm_caches: NpmCaches) -> None:
    packed, registry, first, second = npm_caches
    home = str(tmp_path / "home")
    npmrc(home, f"{first.url}/npm/")
    app = project(str(tmp_path / "app"), {TOP: "^1.0.0"})
    assert run(["npm", "install", "--package-lock-only"], app, home).returncode == 0
    lock = os.path.join(app, "package-lock.json")
    with open(lock) as f:
        text = f.read().replace(first.url, second.url)
    with open(lock, "w") as f:
        f.write(text)

    # A cache that has nothing: warmed from the lockfile.
    result = warm(second.url, lock)
    assert result.returncode == 0, result.stderr
    summary = result.stderr.strip().splitlines()[-1]
    assert re.match(r"6 items: 0 already cached, 6 fetched, 0 failed, 0 mismatched", summary), summary
    again = warm(second.url, lock).stderr.strip().splitlines()[-1]
    assert again.startswith("6 items: 6 already cached, 0 fetched"), again

    # The registry gone, the client's cache empty: npm ci from the cache.
    registry.stop()
    npmrc(home, f"{second.url}/npm/")
    shutil.rmtree(os.path.join(home, "npm-cache"), ignore_errors=True)
    result = run(["npm", "ci"], app, home)
    assert result.returncode == 0, result.stderr
    check_installed(os.path.join(app, "node_modules"), packed, EXPECTED)

    # A lockfile whose integrity was altered: reported, exit 1.
    document = json.loads(text)
    leaf = next(k for k in document["packages"] if k.endswith("cc-fixture-leaf"))
    document["packages"][leaf]["integrity"] = "sha512-" + "A" * 86 + "=="
    altered = os.path.join(str(tmp_path / "altered"), "package-lock.json")
    os.makedirs(os.path.dirname(altered))
    with open(altered, "w") as f:
        json.dump(document, f)
    result = warm(second.url, altered)
    assert result.returncode == 1
    assert re.search(r"^MISMATCH: cc-fixture-leaf@1\.1\.0: integrity sha512-", result.stderr, re.M), result.stderr


def test_warm_from_go_sum_then_go_mod_download_offline(tmp_path: Any) -> None:
    upstream = UpstreamFixture(build_tree(str(tmp_path / "proxy"), modules()))
    first = Daemon(str(tmp_path / "first"), ["--go-upstream", upstream.url, "--go-sumdb", "off"])
    second = Daemon(str(tmp_path / "second"), ["--go-upstream", upstream.url, "--go-sumdb", "off"])
    try:
        project_dir = tmp_path / "project"
        project_dir.mkdir()
        (project_dir / "go.mod").write_text(f"module example.com/project\n\ngo 1.19\n\nrequire {HELLO} v1.1.0\n")
        (project_dir / "main.go").write_text(
            f'package main\n\nimport (\n\t"fmt"\n\n\t"{HELLO}"\n)\n\nfunc main() {{ fmt.Println(hello.Hello()) }}\n')
        tidy = go(str(tmp_path / "a"), "mod", "tidy", cwd=str(project_dir), GOPROXY=f"{first.url}/goproxy",
                  GOSUMDB="off")
        assert tidy.returncode == 0, tidy.stderr
        go_sum, go_mod = str(project_dir / "go.sum"), str(project_dir / "go.mod")

        result = warm(second.url, go_sum, go_mod)
        assert result.returncode == 0, result.stderr
        assert re.search(r"0 failed, 0 mismatched", result.stderr), result.stderr

        upstream.stop()
        download = go(str(tmp_path / "b"), "mod", "download", cwd=str(project_dir),
                      GOPROXY=f"{second.url}/goproxy", GOSUMDB="off")
        assert download.returncode == 0, download.stderr
        built = go(str(tmp_path / "b"), "build", "-o", str(tmp_path / "app"), ".", cwd=str(project_dir),
                   GOPROXY=f"{second.url}/goproxy", GOSUMDB="off")
        assert built.returncode == 0, built.stderr

        # An altered go.sum: every line it changed is a mismatch.
        altered = tmp_path / "altered"
        altered.mkdir()
        lines = (project_dir / "go.sum").read_text().splitlines()
        lines[0] = lines[0].rsplit(" ", 1)[0] + " h1:" + "A" * 43 + "="
        (altered / "go.sum").write_text("\n".join(lines) + "\n")
        result = warm(second.url, str(altered / "go.sum"))
        assert result.returncode == 1 and "MISMATCH: " in result.stderr, result.stderr
    finally:
        first.stop()
        second.stop()
        upstream.stop()


def test_what_warm_cannot_read_is_one_sentence(tmp_path: Any) -> None:
    path = tmp_path / "yarn.lock.txt"
    path.write_text("x")
    result = warm("http://127.0.0.1:9", str(path))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"contentcache: {path}: not a lockfile this reads "
        "(package-lock.json, npm-shrinkwrap.json, pnpm-lock.yaml, yarn.lock, go.sum, go.mod)."]


def test_warm_from_pnpm_and_yarn_lockfiles_then_install_offline(tmp_path: Any, npm_caches: NpmCaches) -> None:
    from .test_npm import BERRY, CLASSIC, CLIENTS

    packed, registry, first, second = npm_caches
    clients = {
        "pnpm": ([os.path.join(CLIENTS, "pnpm"), "install", "--reporter=append-only"],
                 [os.path.join(CLIENTS, "pnpm"), "install", "--frozen-lockfile", "--reporter=append-only"],
                 "pnpm-lock.yaml"),
        "yarn-classic": (["node", CLASSIC, "install", "--non-interactive"],
                         ["node", CLASSIC, "install", "--frozen-lockfile", "--non-interactive"], "yarn.lock"),
        "yarn-berry": (["node", BERRY, "install"], ["node", BERRY, "install", "--immutable"], "yarn.lock"),
    }
    made = {}
    for client, (install, _, lockfile) in clients.items():
        home = str(tmp_path / client / "home")
        app = project(str(tmp_path / client / "app"), {TOP: "^1.0.0"})
        made[client] = (app, home)

        def configure(url: str) -> None:
            npmrc(home, f"{url}/npm/")
            with open(os.path.join(app, ".yarnrc"), "w") as f:
                f.write(f'registry "{url}/npm/"\n')
            with open(os.path.join(app, ".yarnrc.yml"), "w") as f:
                f.write(f'npmRegistryServer: "{url}/npm/"\nunsafeHttpWhitelist: ["127.0.0.1"]\n'
                        "nodeLinker: node-modules\nenableGlobalCache: false\nenableTelemetry: false\n")

        configure(first.url)
        env = {"YARN_ENABLE_IMMUTABLE_INSTALLS": "false", "YARN_CACHE_FOLDER": os.path.join(home, "yarn-cache"),
               "npm_config_store_dir": os.path.join(home, "pnpm-store")}
        result = run(install, app, home, **env)
        assert result.returncode == 0, f"{client}: {result.stdout}{result.stderr}"
        # The lockfile names the first cache's address: as behind one load
        # balancer, the second answers for it.
        path = os.path.join(app, lockfile)
        with open(path) as f:
            text = f.read().replace(first.url, second.url)
        with open(path, "w") as f:
            f.write(text)
        configure(second.url)
        made[client] = (app, home, env, path)

    result = warm(second.url, *{m[3] for m in made.values()})
    assert result.returncode == 0, result.stderr
    assert re.search(r" 0 failed, 0 mismatched", result.stderr), result.stderr

    registry.stop()
    for client, (app, home, env, _) in made.items():
        shutil.rmtree(os.path.join(app, "node_modules"), ignore_errors=True)
        for cache in ("yarn-cache", "pnpm-store", "npm-cache", ".cache"):
            shutil.rmtree(os.path.join(home, cache), ignore_errors=True)
        shutil.rmtree(os.path.join(app, ".yarn", "cache"), ignore_errors=True)
        result = run(clients[client][1], app, home, **{**env, "YARN_ENABLE_IMMUTABLE_INSTALLS": "true"})
        assert result.returncode == 0, f"{client} offline: {result.stdout}{result.stderr}"
        check_installed(os.path.join(app, "node_modules"), packed, EXPECTED, pnpm=client == "pnpm")
