"""
Verdaccio 6.8.0, a real private npm registry, for tests: installed by the
README's test command into .tools/verdaccio, run on 127.0.0.1 with
htpasswd authentication and no uplink, its storage in a temp directory.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import time

from .npmpackages import HERE

PROGRAM = os.path.join(os.path.dirname(HERE), ".tools", "verdaccio", "node_modules", "verdaccio", "bin", "verdaccio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Verdaccio:
    """
    Verdaccio with one user, C{publisher} (signed up at start, the only one
    it allows), who may read and publish everything; nobody else may read
    anything.
    """

    USER = "publisher"

    def __init__(self, directory: str) -> None:
        if not os.path.exists(PROGRAM):
            raise RuntimeError(f"Verdaccio is missing ({PROGRAM}): run the README's test command")
        os.makedirs(directory, exist_ok=True)
        self.password = base64.b16encode(os.urandom(12)).decode().lower()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "storage": os.path.join(directory, "storage"),
            "plugins": os.path.join(directory, "plugins"),
            "web": {"enable": False},
            # One user may sign up: ours, below; then nobody.
            "auth": {"htpasswd": {"file": os.path.join(directory, "htpasswd"), "max_users": 1}},
            "uplinks": {},
            "packages": {"**": {"access": "$authenticated", "publish": "$authenticated"}},
            "log": {"type": "stdout", "format": "pretty", "level": "warn"},
            "listen": f"127.0.0.1:{self.port}",
        }
        path = os.path.join(directory, "config.yaml")
        with open(path, "w") as f:
            json.dump(config, f)  # JSON is YAML
        self._log = open(os.path.join(directory, "verdaccio.log"), "wb")
        self.process = subprocess.Popen(
            [shutil.which("node") or "node", PROGRAM, "--config", path],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "NODE_ENV": "production"},
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if self._call("GET", "/-/ping")[0] == 200:
                    break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Verdaccio did not start; see {self._log.name}")
            time.sleep(0.2)
        status, body = self._call("PUT", f"/-/user/org.couchdb.user:{self.USER}",
                                  {"name": self.USER, "password": self.password})
        if status not in (200, 201):
            self.stop()
            raise RuntimeError(f"Verdaccio refused its own user ({status}: {body!r})")
        #: The publisher's token: what contentcache's route sends.
        self.token = str(json.loads(body)["token"])

    def _call(self, method: str, path: str, document: object = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            body = json.dumps(document).encode() if document is not None else None
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def publish(self, package_dir: str, home: str) -> None:
        """
        C{npm publish} of the package in C{package_dir}, as the publisher.
        """
        os.makedirs(home, exist_ok=True)
        with open(os.path.join(home, ".npmrc"), "w") as f:
            f.write(f"registry={self.url}/\n//127.0.0.1:{self.port}/:_authToken={self.token}\n")
        env = {k: v for k, v in os.environ.items() if not k.lower().startswith("npm_config_")}
        result = subprocess.run(["npm", "publish", "--registry", f"{self.url}/"], cwd=package_dir,
                                env={**env, "HOME": home, "npm_config_cache": os.path.join(home, "npm-cache")},
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"npm publish failed: {result.stdout}{result.stderr}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
