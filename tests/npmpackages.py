"""
npm packages for the tests, packed with the real `npm pack`, and a
registry fixture that serves their packuments and tarballs on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from attrs import frozen

from .upstream import UpstreamFixture

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENTS = os.path.join(os.path.dirname(HERE), ".tools", "node_modules", ".bin")


@frozen
class Package:
    name: str
    version: str
    dependencies: dict[str, str]
    bin: dict[str, str] | None = None

    @property
    def base(self) -> str:
        return self.name.rsplit("/", 1)[-1]


LEAF = "cc-fixture-leaf"
MIDDLE = "@cc-fixture/middle"
TOP = "cc-fixture-top"

PACKAGES = [
    Package(LEAF, "1.0.0", {}),
    Package(LEAF, "1.1.0", {}),
    Package(LEAF, "2.0.0-beta.1", {}),
    Package(MIDDLE, "1.0.0", {LEAF: "^1.0.0"}),
    Package(MIDDLE, "1.0.1", {LEAF: "^1.1.0"}),
    Package(TOP, "1.0.0", {MIDDLE: "^1.0.0"}, bin={"cc-fixture-top": "bin/cli.js"}),
]
DIST_TAGS = {LEAF: {"latest": "1.1.0", "next": "2.0.0-beta.1"}, MIDDLE: {"latest": "1.0.1"}, TOP: {"latest": "1.0.0"}}


def clean_env(home: str, **extra: str) -> dict[str, str]:
    """
    An environment for a JavaScript package client that ignores the
    machine's own configuration: its HOME, npm user config and caches are
    the test's.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().startswith(("npm_config_", "yarn_", "pnpm_", "corepack_")) and k != "CI"
    }
    env.update({
        "HOME": home,
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "XDG_CACHE_HOME": os.path.join(home, ".cache"),
        "XDG_DATA_HOME": os.path.join(home, ".local", "share"),
        "npm_config_userconfig": os.path.join(home, ".npmrc"),
        "npm_config_globalconfig": os.path.join(home, "global-npmrc"),
        "npm_config_cache": os.path.join(home, "npm-cache"),
        "npm_config_update_notifier": "false",
        "npm_config_fund": "false",
        "npm_config_audit": "false",
        "PATH": CLIENTS + os.pathsep + env.get("PATH", os.defpath),
    })
    env.update(extra)
    return env


def pack(package: Package, work: str) -> dict[str, Any]:
    """
    Make the package's source and `npm pack` it; returns npm's report
    (filename, integrity, shasum) with the tarball's path.
    """
    source = os.path.join(work, "src", package.name.replace("/", "__"), package.version)
    os.makedirs(source, exist_ok=True)
    manifest: dict[str, Any] = {
        "name": package.name,
        "version": package.version,
        "description": f"test fixture {package.name}",
        "license": "MIT",
        "main": "index.js",
        "dependencies": package.dependencies,
    }
    with open(os.path.join(source, "index.js"), "w") as f:
        f.write(f"module.exports = {json.dumps(package.name + '@' + package.version)};\n")
    if package.bin:
        manifest["bin"] = package.bin
        for path in package.bin.values():
            os.makedirs(os.path.dirname(os.path.join(source, path)), exist_ok=True)
            with open(os.path.join(source, path), "w") as f:
                f.write(f"#!/usr/bin/env node\nconsole.log({json.dumps(package.name + ' ' + package.version)});\n")
    with open(os.path.join(source, "package.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    out = os.path.join(work, "packed")
    os.makedirs(out, exist_ok=True)
    home = os.path.join(work, "home")
    os.makedirs(home, exist_ok=True)
    result = subprocess.run(
        ["npm", "pack", "--json", "--pack-destination", out],
        cwd=source, env=clean_env(home), capture_output=True, text=True, timeout=120, check=True,
    )
    report: dict[str, Any] = json.loads(result.stdout)[0]
    report["path"] = os.path.join(out, report["filename"])
    report["manifest"] = manifest
    return report


class RegistryFixture(UpstreamFixture):
    """
    A registry serving full packuments (never the abbreviated form: the
    cache must cope with an upstream that ignores that Accept) and the
    packed tarballs, at the standard paths.
    """

    def __init__(
        self, root: str, packed: list[tuple[Package, dict[str, Any]]], dist_tags: dict[str, dict[str, str]] | None = None,
        abbreviated: bool = False,
    ) -> None:
        super().__init__(root)
        #: Serve the abbreviated form (without times) to a client asking for it.
        self.abbreviate = abbreviated
        self.packuments: dict[str, dict[str, Any]] = {}
        for package, report in packed:
            tarball = f"/{package.name}/-/{package.base}-{package.version}.tgz"
            destination = os.path.join(root, *tarball.lstrip("/").split("/"))
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            shutil.copy(report["path"], destination)
            document = self.packuments.setdefault(package.name, {
                "name": package.name,
                "dist-tags": (dist_tags or DIST_TAGS)[package.name],
                "versions": {},
                "time": {"created": "2024-01-02T03:04:05.000Z", "modified": "2024-01-02T03:04:05.000Z"},
            })
            document["time"][package.version] = "2024-01-02T03:04:05.000Z"
            document["versions"][package.version] = {
                **report["manifest"],
                "_id": f"{package.name}@{package.version}",
                "dist": {
                    "tarball": self.url + tarball,
                    "integrity": report["integrity"],
                    "shasum": report["shasum"],
                    "signatures": [{"keyid": "SHA256:test", "sig": "MEUCIQDtest"}],
                },
            }
        for name in self.packuments:
            self.publish(name)

    def publish(self, name: str) -> None:
        document = self.packuments[name]
        body = json.dumps(document).encode()
        short = json.dumps({
            "name": name,
            "dist-tags": document["dist-tags"],
            "modified": document["time"]["modified"],
            "versions": {
                version: {k: v for k, v in manifest.items() if k in ("name", "version", "dependencies", "bin", "dist")}
                for version, manifest in document["versions"].items()
            },
        }).encode()
        for path in {"/" + name, "/" + name.replace("/", "%2f"), "/" + name.replace("/", "%2F")}:
            self.override[path] = (200, body)
            if self.abbreviate:
                self.abbreviated[path] = short
