"""
Private packages: npm routes in the configuration file, their
credentials, and the client tokens what they fetched needs.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from typing import Any, Iterator

import pytest

from .daemon import TWISTD, Daemon
from .gomodules import GREET, ModuleVersion, SumDBFixture, build_tree, modules
from .npmpackages import MIDDLE, PACKAGES, TOP, RegistryFixture, pack
from .test_auth import get
from .test_goproxy import SUMDB_NAME, go, gosumdb_binary  # noqa: F401  (a module fixture)
from .test_npm import EXPECTED, check_installed, npmrc, project, run
from .tls import make_ca
from .upstream import UpstreamFixture

SECRET = "corp-route-secret-0123456789"


class PrivateRegistry(RegistryFixture):
    """
    A registry that answers only requests with its own token.
    """

    def _answer(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        if handler.headers.get("Authorization") != f"Bearer {SECRET}":
            with self._lock:
                self.log.append((handler.command, handler.path, dict(handler.headers)))
            self._send(handler, 401, b'{"error":"unauthorized"}', head)
            return
        super()._answer(handler, head)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Any, dict[str, Any]]]:
    work = str(tmp_path_factory.mktemp("packages"))
    return [(package, pack(package, work)) for package in PACKAGES]


@pytest.fixture
def registries(tmp_path: Any, packed: list[tuple[Any, dict[str, Any]]]) -> Iterator[tuple[RegistryFixture, RegistryFixture]]:
    private = PrivateRegistry(str(tmp_path / "private"), [p for p in packed if p[0].name == MIDDLE])
    public = RegistryFixture(str(tmp_path / "public"), [p for p in packed if p[0].name != MIDDLE])
    yield private, public
    private.stop()
    public.stop()


def config(tmp_path: Any, private: RegistryFixture, **extra: str) -> str:
    upstream = extra.pop("upstream", f"{private.url}/")
    lines = ["[[npm.routes]]", 'packages = ["@cc-fixture/*"]', f'upstream = "{upstream}"',
             'token_env = "CORP_NPM_TOKEN"', *(f'{k} = "{v}"' for k, v in extra.items())]
    path = os.path.join(str(tmp_path), "contentcache.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def admin(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "contentcache.cli", *args], capture_output=True, text=True,
                          timeout=60, check=True).stdout.strip()


def test_a_routed_scope_comes_from_its_registry_with_its_token_and_needs_a_client_token(
    tmp_path: Any, registries: tuple[RegistryFixture, RegistryFixture], packed: Any
) -> None:
    private, public = registries
    storage = str(tmp_path / "storage")
    daemon = Daemon(storage, ["--config", config(tmp_path, private), "--npm-upstream", public.url],
                    env={"CORP_NPM_TOKEN": SECRET})
    try:
        token = admin("token", "create", "ci", "--storage", storage)
        # Not cached yet, and not fetched for a request without a token.
        assert get(daemon.url, "/npm/@cc-fixture%2fmiddle")[0] == 401
        assert private.log == []
        home = str(tmp_path / "home")
        address = daemon.url.removeprefix("http:")
        npmrc(home, f"{daemon.url}/npm/", **{f"{address}/npm/:_authToken": token})
        app = project(str(tmp_path / "app"), {TOP: "^1.0.0"})
        result = run(["npm", "install"], app, home)
        assert result.returncode == 0, result.stderr + daemon.log()[-3000:]
        check_installed(os.path.join(app, "node_modules"), packed, EXPECTED)

        # The route's credential went to its registry only; no client token
        # went anywhere upstream.
        assert private.count("/@cc-fixture%2fmiddle") + private.count("/@cc-fixture%2Fmiddle") \
            + private.count("/@cc-fixture/middle") >= 1
        assert all(h.get("Authorization") == f"Bearer {SECRET}" for _, _, h in private.log)
        assert all("Authorization" not in h for _, _, h in public.log)
        assert public.count("/@cc-fixture%2fmiddle") + public.count("/@cc-fixture%2Fmiddle") == 0

        # Without a token: the private scope is refused, cached or not; the
        # public packages are served (--access public).
        for path in ("/npm/@cc-fixture%2fmiddle", "/npm/@cc-fixture/middle/-/middle-1.0.1.tgz",
                     "/npm/-/package/@cc-fixture/middle/dist-tags"):
            status, headers, body = get(daemon.url, path)
            assert status == 401 and b"cc-fixture" not in body, (path, status, body)
        status, headers, _ = get(daemon.url, "/npm/cc-fixture-leaf")
        assert status == 200 and headers["cache-control"][0].startswith("public")
        # A token's answer is the client's alone: no shared cache in front
        # may keep it (and serve it to someone without one).
        for routed in ("/npm/@cc-fixture%2fmiddle", "/npm/@cc-fixture/middle/-/middle-1.0.1.tgz"):
            status, headers, _ = get(daemon.url, routed, f"Bearer {token}")
            assert status == 200 and headers["cache-control"][0].startswith("private"), headers
            assert "public" not in headers["cache-control"][0] and "Authorization" in ", ".join(headers["vary"])
        # An audit never names a routed package to the public registry.
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", int(daemon.url.rsplit(":", 1)[1]), timeout=30)
        connection.request("POST", "/npm/-/npm/v1/security/advisories/bulk",
                           body=json.dumps({"@cc-fixture/middle": ["1.0.1"], "cc-fixture-leaf": ["1.1.0"]}),
                           headers={"Content-Type": "application/json"})
        audit = connection.getresponse()
        answer = audit.read()
        connection.close()
        assert audit.status == 404, (audit.status, answer)  # the fixture has no audits: passed on as it said
        assert public.bodies and all(b"@cc-fixture" not in body for body in public.bodies)
        assert b"cc-fixture-leaf" in public.bodies[-1]
        log = daemon.log()
        assert SECRET not in log and token not in log and "Traceback" not in log
    finally:
        daemon.stop()


def test_a_public_route_needs_no_token(tmp_path: Any, registries: tuple[RegistryFixture, RegistryFixture]) -> None:
    private, public = registries
    daemon = Daemon(str(tmp_path / "storage"), ["--config", config(tmp_path, private, access="public"),
                                                "--npm-upstream", public.url], env={"CORP_NPM_TOKEN": SECRET})
    try:
        assert get(daemon.url, "/npm/@cc-fixture%2fmiddle")[0] == 200
    finally:
        daemon.stop()


@pytest.mark.parametrize("extra, env, message", [
    ({}, {}, "line 4: key 'token_env': the environment variable CORP_NPM_TOKEN is not set."),
    ({"token": SECRET}, {"CORP_NPM_TOKEN": SECRET}, "line 5: key 'token': a secret never goes in this file"),
    ({"access": "everyone"}, {"CORP_NPM_TOKEN": SECRET}, "line 5: key 'access' is token or public, not 'everyone'."),
    ({"upstream": "http://ci:hunter2@127.0.0.1:9/"}, {"CORP_NPM_TOKEN": SECRET},
     "line 3: key 'upstream' must not hold credentials"),
])
def test_a_route_that_cannot_work_stops_the_daemon_in_one_sentence(
    tmp_path: Any, registries: tuple[RegistryFixture, RegistryFixture], extra: dict[str, str],
    env: dict[str, str], message: str,
) -> None:
    private, _ = registries
    path = config(tmp_path, private, **extra)
    process = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "contentcache", "--config", path, "--storage", str(tmp_path / "s"),
         "--workers", "2"],
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
        env={k: v for k, v in {**os.environ, **env}.items() if k != "CORP_NPM_TOKEN" or k in env},
    )
    assert process.returncode != 0
    last = (process.stdout + process.stderr).strip().splitlines()[-1]
    assert last.endswith(f"{path}, {message}") or f"{path}, {message}" in last, last
    assert SECRET not in process.stdout + process.stderr


# Go modules.

CORP = "corp.example/lib"
GO_PASSWORD = "corp-go-password-9876543210"


class PrivateGoProxy(UpstreamFixture):
    """
    A module proxy behind basic auth (user ci).
    """

    def _answer(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        expected = "Basic " + base64.b64encode(f"ci:{GO_PASSWORD}".encode()).decode()
        if handler.headers.get("Authorization") != expected:
            with self._lock:
                self.log.append((handler.command, handler.path, dict(handler.headers)))
            self._send(handler, 401, b"unauthorized\n", head)
            return
        super()._answer(handler, head)


def corp_project(tmp_path: Any) -> Any:
    """
    A program that imports the routed module and a public one.
    """
    project_dir = tmp_path / "project"
    project_dir.mkdir()
    (project_dir / "go.mod").write_text(
        f"module example.com/project\n\ngo 1.19\n\nrequire (\n\t{CORP} v1.0.0\n\t{GREET} v1.2.0\n)\n")
    (project_dir / "main.go").write_text(
        f'package main\n\nimport (\n\t"fmt"\n\n\t"{CORP}"\n\t"{GREET}"\n)\n\n'
        'func main() { fmt.Println(lib.Name(), greet.Word()) }\n')
    return project_dir


def go_config(tmp_path: Any, private: UpstreamFixture, access: str) -> str:
    path = os.path.join(str(tmp_path), "go.toml")
    with open(path, "w") as f:
        f.write(f'[[go.routes]]\nmodules = ["corp.example"]\nupstream = "{private.url}"\nusername = "ci"\n'
                f'password_env = "CORP_GO_PASSWORD"\naccess = "{access}"\n')
    return path


def test_a_routed_module_comes_from_its_proxy_and_never_from_a_checksum_database(tmp_path: Any) -> None:
    private = PrivateGoProxy(build_tree(str(tmp_path / "private"), [ModuleVersion(CORP, "v1.0.0", {
        "go.mod": f"module {CORP}\n\ngo 1.19\n",
        "lib.go": 'package lib\n\nfunc Name() string { return "corp" }\n',
    })]))
    public = UpstreamFixture(build_tree(str(tmp_path / "public"), modules()))
    sumdb = UpstreamFixture(str(tmp_path / "no-records"))  # records what it is asked
    daemon = Daemon(str(tmp_path / "storage"), [
        "--config", go_config(tmp_path, private, "public"), "--go-upstream", public.url,
        "--go-sumdb", f"sum.test.example={sumdb.url}",
    ], env={"CORP_GO_PASSWORD": GO_PASSWORD})
    try:
        project_dir = corp_project(tmp_path)
        built = go(str(tmp_path / "client"), "build", "-o", str(tmp_path / "app"), ".", cwd=str(project_dir),
                   GOPROXY=f"{daemon.url}/goproxy", GOSUMDB="off", GONOSUMDB="corp.example",
                   GOPRIVATE="")
        assert built.returncode == 0, built.stderr + daemon.log()[-3000:]
        assert subprocess.run([str(tmp_path / "app")], capture_output=True, text=True).stdout == "corp Hi\n"

        assert private.count(f"/{CORP}/@v/v1.0.0.zip") == 1
        expected = "Basic " + base64.b64encode(f"ci:{GO_PASSWORD}".encode()).decode()
        assert all(h.get("Authorization") == expected for _, _, h in private.log)
        assert all("Authorization" not in h for _, _, h in public.log)
        assert not any("corp.example" in path for _, path, _ in public.log + sumdb.log)
        assert any(GREET in path for _, path, _ in sumdb.log)  # the public module was looked up
        status, _, _ = get(daemon.url, f"/goproxy/sumdb/sum.test.example/lookup/{CORP}@v1.0.0")
        assert status == 404 and not any("corp.example" in path for _, path, _ in sumdb.log)
        assert GO_PASSWORD not in daemon.log()
    finally:
        daemon.stop()
        private.stop()
        public.stop()
        sumdb.stop()


def test_a_routed_module_needs_a_client_token(tmp_path: Any) -> None:
    private = PrivateGoProxy(build_tree(str(tmp_path / "private"), [ModuleVersion(CORP, "v1.0.0", {
        "go.mod": f"module {CORP}\n\ngo 1.19\n", "lib.go": "package lib\n"})]))
    storage = str(tmp_path / "storage")
    daemon = Daemon(storage, ["--config", go_config(tmp_path, private, "token"), "--go-sumdb", "off"],
                    env={"CORP_GO_PASSWORD": GO_PASSWORD})
    try:
        token = admin("token", "create", "builds", "--storage", storage)
        path = f"/goproxy/{CORP}/@v/v1.0.0.info"
        assert get(daemon.url, path)[0] == 401
        basic = base64.b64encode(f"anyone:{token}".encode()).decode()
        assert get(daemon.url, path, f"Basic {basic}")[0] == 200
        assert get(daemon.url, path)[0] == 401  # cached now, and still not without a token
    finally:
        daemon.stop()
        private.stop()


def test_go_builds_a_routed_module_over_https_with_its_netrc_token(tmp_path: Any, gosumdb_binary: str) -> None:
    # As the go command needs it: credentials from ~/.netrc go only over
    # https, so the daemon serves TLS itself (each worker wrapping it). The
    # public module is verified against a real checksum database, through
    # the daemon, that knows nothing of corp.example.
    ca = make_ca(str(tmp_path / "ca"))
    private = PrivateGoProxy(build_tree(str(tmp_path / "private"), [ModuleVersion(CORP, "v1.0.0", {
        "go.mod": f"module {CORP}\n\ngo 1.19\n",
        "lib.go": 'package lib\n\nfunc Name() string { return "corp" }\n',
    })]))
    tree = build_tree(str(tmp_path / "public"), modules())
    public = UpstreamFixture(tree)
    sumdb = SumDBFixture(gosumdb_binary, SUMDB_NAME, tree)
    storage = str(tmp_path / "storage")
    daemon = Daemon(storage, [
        "--port", f"ssl:0:interface=127.0.0.1:privateKey={ca.key_file}:certKey={ca.cert_file}", "--workers", "2",
        "--config", go_config(tmp_path, private, "token"), "--go-upstream", public.url,
        "--go-sumdb", f"{SUMDB_NAME}={sumdb.url}",
    ], env={"CORP_GO_PASSWORD": GO_PASSWORD})
    try:
        token = admin("token", "create", "builder", "--storage", storage)
        home = str(tmp_path / "client")
        os.makedirs(home)
        with open(os.path.join(home, ".netrc"), "w") as f:
            f.write(f"machine 127.0.0.1 login builder password {token}\n")
        project_dir = corp_project(tmp_path)
        proxy = f"https://127.0.0.1:{daemon.port}/goproxy"
        built = go(home, "build", "-o", str(tmp_path / "app"), ".", cwd=str(project_dir), GOPROXY=proxy,
                   GOSUMDB=sumdb.vkey, GONOSUMDB="corp.example", GOPRIVATE="", SSL_CERT_FILE=ca.ca_file)
        assert built.returncode == 0, built.stderr + daemon.log()[-3000:]
        assert subprocess.run([str(tmp_path / "app")], capture_output=True, text=True).stdout == "corp Hi\n"
        # Without the token (another machine, no .netrc), nothing of corp.
        os.remove(os.path.join(home, ".netrc"))
        refused = go(str(tmp_path / "other"), "mod", "download", f"{CORP}@v1.0.0", GOPROXY=proxy, GOSUMDB="off",
                     GONOSUMDB="corp.example", SSL_CERT_FILE=ca.ca_file)
        assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr
        log = daemon.log()
        assert f"GET /goproxy/sumdb/{SUMDB_NAME}/lookup/{GREET}@v1.2.0" in log  # the client verified greet
        assert "lookup/corp.example" not in log
        assert token not in log and GO_PASSWORD not in log
        assert all("Authorization" not in h for _, _, h in public.log)
    finally:
        daemon.stop()
        private.stop()
        public.stop()
        sumdb.stop()


# The real private registry.

def test_private_scope_on_verdaccio_through_npm_pnpm_and_yarn_with_tokens(
    tmp_path: Any, packed: list[tuple[Any, dict[str, Any]]]
) -> None:
    from .test_npm import BERRY, CLIENTS
    from .verdaccio import Verdaccio

    public = RegistryFixture(str(tmp_path / "public"), packed)
    verdaccio = Verdaccio(str(tmp_path / "verdaccio"))
    daemon: Daemon | None = None
    try:
        # @corp/a, depending on a public package, published to Verdaccio.
        source = tmp_path / "corp-a"
        source.mkdir()
        (source / "package.json").write_text(json.dumps({
            "name": "@corp/a", "version": "1.0.0", "main": "index.js",
            "dependencies": {"cc-fixture-leaf": "^1.0.0"}}))
        (source / "index.js").write_text("module.exports = 'corp a';\n")
        verdaccio.publish(str(source), str(tmp_path / "publisher"))

        path = os.path.join(str(tmp_path), "corp.toml")
        with open(path, "w") as f:
            f.write(f'[[npm.routes]]\npackages = ["@corp/*"]\nupstream = "{verdaccio.url}/"\n'
                    'token_env = "CORP_NPM_TOKEN"\n')
        storage = str(tmp_path / "storage")
        daemon = Daemon(storage, ["--config", path, "--npm-upstream", public.url, "--log-format", "json"],
                        env={"CORP_NPM_TOKEN": verdaccio.token})
        token = admin("token", "create", "ci", "--storage", storage)
        base = f"{daemon.url}/npm/"
        address = daemon.url.removeprefix("http:")
        clients = {
            "npm": ["npm", "install"],
            "pnpm": [os.path.join(CLIENTS, "pnpm"), "install", "--reporter=append-only"],
            "yarn-berry": ["node", BERRY, "install"],
        }
        apps = {}
        for client, argv in clients.items():
            home = str(tmp_path / client / "home")
            npmrc(home, base, **{f"{address}/npm/:_authToken": token})
            app = project(str(tmp_path / client / "app"), {"@corp/a": "^1.0.0"})
            if client == "yarn-berry":
                with open(os.path.join(app, ".yarnrc.yml"), "w") as f:
                    f.write(f'npmRegistryServer: "{base}"\nunsafeHttpWhitelist: ["127.0.0.1"]\n'
                            f'npmAuthToken: "{token}"\nnpmAlwaysAuth: true\nnodeLinker: node-modules\n'
                            "enableGlobalCache: false\nenableTelemetry: false\n"
                            # Yarn quarantines releases younger than a day: @corp/a is minutes old.
                            "npmMinimalAgeGate: 0\n")
            env = {"YARN_ENABLE_IMMUTABLE_INSTALLS": "false", "YARN_CACHE_FOLDER": os.path.join(home, "yarn-cache"),
                   "npm_config_store_dir": os.path.join(home, "pnpm-store")}
            result = run(argv, app, home, **env)
            assert result.returncode == 0, f"{client}: {result.stdout}\n{result.stderr}\n{daemon.log()[-3000:]}"
            installed = os.path.join(app, "node_modules", "@corp", "a", "index.js")
            assert open(installed).read() == "module.exports = 'corp a';\n", client
            # The public dependency came too (pnpm keeps it in its own layout).
            modules_dir = os.path.join(app, "node_modules")
            assert os.path.exists(os.path.join(modules_dir, "cc-fixture-leaf")) or any(
                name.startswith("cc-fixture-leaf@") for name in os.listdir(os.path.join(modules_dir, ".pnpm"))
            ), client
            apps[client] = (app, home, env)

        # npm ci from the lockfile with Verdaccio gone: from the cache.
        verdaccio.stop()
        app, home, env = apps["npm"]
        shutil.rmtree(os.path.join(app, "node_modules"))
        shutil.rmtree(os.path.join(home, "npm-cache"), ignore_errors=True)
        result = run(["npm", "ci"], app, home, **env)
        assert result.returncode == 0, result.stdout + result.stderr

        # Without a token: nothing of @corp, cached as it is.
        for where in ("/npm/@corp%2fa", "/npm/@corp/a/-/a-1.0.0.tgz", "/npm/-/package/@corp/a/dist-tags"):
            status, _, body = get(daemon.url, where)
            assert status == 401 and b"corp a" not in body, (where, status)
        # No route credential or client token reached the public upstream;
        # no client token reached Verdaccio (its log of requests is ours to
        # read only through its storage: contentcache sends it the route's).
        assert all("authorization" not in {k.lower() for k in h} for _, _, h in public.log)
        log = daemon.log()
        assert token not in log and verdaccio.token not in log
        assert '"log_namespace"' in log or log.lstrip().startswith("{")  # the JSON format
    finally:
        if daemon is not None:
            daemon.stop()
        verdaccio.stop()
        public.stop()
