"""
Go modules for the tests, laid out as a GOPROXY directory, and a real
checksum database over them (tests/go/gosumdb, built with Debian's
golang.org/x/mod).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from typing import Iterator

from attrs import frozen

from contentcache.protocol.goproxy.paths import escape

HERE = os.path.dirname(os.path.abspath(__file__))
GOCODE = "/usr/share/gocode"


@frozen
class ModuleVersion:
    path: str
    version: str
    files: dict[str, str]
    #: The .mod file; None means the go.mod among files (or, without one,
    #: the synthesized "module <path>" of a +incompatible version).
    mod: str | None = None
    time: str = "2024-01-02T03:04:05Z"

    @property
    def go_mod(self) -> str:
        if self.mod is not None:
            return self.mod
        return self.files.get("go.mod", f"module {self.path}\n")


def _package(name: str, body: str = "") -> str:
    return f"package {name}\n\n{body}\n"


GREET = "example.com/greet"
HELLO = "example.com/hello"
UPPER = "example.com/Upper/Case"
LEGACY = "example.com/legacy"
PSEUDO = "v0.0.0-20240102030405-abcdefabcdef"


def modules() -> list[ModuleVersion]:
    """
    Several modules, several versions each: one with upper-case letters in
    its path, one that depends on another, a +incompatible version and a
    pseudo-version.
    """
    out = []
    for version, word in [("v1.0.0", "Hello"), ("v1.2.0", "Hi"), (PSEUDO, "Yo")]:
        out.append(ModuleVersion(GREET, version, {
            "go.mod": f"module {GREET}\n\ngo 1.19\n",
            "greet.go": _package("greet", f'func Word() string {{ return "{word}" }}'),
            "LICENSE": "Public domain.\n",
        }))
    for version, dep in [("v1.0.0", "v1.0.0"), ("v1.1.0", "v1.2.0")]:
        out.append(ModuleVersion(HELLO, version, {
            "go.mod": f"module {HELLO}\n\ngo 1.19\n\nrequire {GREET} {dep}\n",
            "hello.go": _package(
                "hello",
                f'import "{GREET}"\n\nfunc Hello() string {{ return greet.Word() + ", world" }}',
            ),
            "internal/doc.go": _package("internal"),
        }))
    for version in ["v0.1.0", "v0.2.0"]:
        out.append(ModuleVersion(UPPER, version, {
            "go.mod": f"module {UPPER}\n\ngo 1.19\n",
            "Case.go": _package("Case", f'const Version = "{version}"'),
        }))
    out.append(ModuleVersion(LEGACY, "v1.0.0", {"legacy.go": _package("legacy")}))
    out.append(ModuleVersion(LEGACY, "v2.0.0+incompatible", {"legacy.go": _package("legacy", "const Two = 2")}))
    return out


def write_zip(path: str, mv: ModuleVersion, extra: dict[str, str] | None = None) -> None:
    prefix = f"{mv.path}@{mv.version}/"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in sorted({**mv.files, **(extra or {})}.items()):
            info = zipfile.ZipInfo(prefix + name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, content)


def build_tree(root: str, versions: list[ModuleVersion]) -> str:
    """
    Write C{versions} as a GOPROXY directory under C{root}.
    """
    by_module: dict[str, list[str]] = {}
    for mv in versions:
        base = os.path.join(root, *escape(mv.path).split("/"), "@v")
        os.makedirs(base, exist_ok=True)
        name = os.path.join(base, escape(mv.version))
        with open(name + ".info", "w") as f:
            json.dump({"Version": mv.version, "Time": mv.time}, f)
        with open(name + ".mod", "w") as f:
            f.write(mv.go_mod)
        write_zip(name + ".zip", mv)
        if "-" not in mv.version.split("+")[0]:  # lists hold releases, not pseudo-versions
            by_module.setdefault(mv.path, []).append(mv.version)
    for path, listed in by_module.items():
        with open(os.path.join(root, *escape(path).split("/"), "@v", "list"), "w") as f:
            f.write("".join(f"{v}\n" for v in listed))
    for path in {mv.path for mv in versions}:
        latest = max((mv for mv in versions if mv.path == path and "+" not in mv.version and "-" not in mv.version),
                     key=lambda mv: [int(x) for x in mv.version[1:].split(".")])
        with open(os.path.join(root, *escape(path).split("/"), "@latest"), "w") as f:
            json.dump({"Version": latest.version, "Time": latest.time}, f)
    return root


def build_payload_modules(root: str, path: str, versions: list[str], payload_size: int) -> dict[str, str]:
    """
    A GOPROXY tree under C{root} holding C{versions} of module C{path},
    each zip a go.mod and C{payload_size} random bytes stored as they are
    (so the zip is as large however it is stored); the zip file of each.
    """
    go_mod = f"module {path}\n\ngo 1.19\n"
    build_tree(root, [ModuleVersion(path, version, {"go.mod": go_mod}) for version in versions])
    zips = {}
    for version in versions:
        base = os.path.join(root, *escape(path).split("/"), "@v", escape(version))
        # Written again with the payload: a ModuleVersion's files are text.
        prefix = f"{path}@{version}/"
        with zipfile.ZipFile(base + ".zip", "w") as archive:
            for name, content, method in (
                ("go.mod", go_mod.encode("utf-8"), zipfile.ZIP_DEFLATED),
                ("payload.bin", os.urandom(payload_size), zipfile.ZIP_STORED),
            ):
                info = zipfile.ZipInfo(prefix + name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = method
                archive.writestr(info, content)
        zips[version] = base + ".zip"
    return zips


def build_gosumdb(directory: str) -> str:
    """
    Build the checksum-database fixture (GOPATH mode, Debian's x/mod).
    """
    return build_go_program(directory, "gosumdb")


def build_go_program(directory: str, name: str) -> str:
    """
    Build the program in tests/go/C{name} (GOPATH mode, Debian's x/mod).
    """
    gopath = os.path.join(directory, "gopath")
    source = os.path.join(gopath, "src", name)
    os.makedirs(source, exist_ok=True)
    shutil.copy(os.path.join(HERE, "go", name, "main.go"), source)
    binary = os.path.join(directory, name)
    subprocess.run(
        ["go", "build", "-o", binary, "."],
        cwd=source,
        check=True,
        env={
            **os.environ,
            "GO111MODULE": "off",
            "GOPATH": f"{gopath}:{GOCODE}",
            "GOFLAGS": "",
            "GOCACHE": os.path.join(directory, "gocache"),
        },
        timeout=600,
    )
    return binary


class SumDBFixture:
    """
    The real sumdb server over a GOPROXY directory: its records are the
    reference dirhash of that directory's zips and go.mod files.
    """

    def __init__(self, binary: str, name: str, proxy_root: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [binary, name, proxy_root], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.vkey = self.process.stdout.readline().strip()
        self.url = "http://" + self.process.stdout.readline().strip()

    @property
    def gosumdb(self) -> str:
        """
        The GOSUMDB value that makes the go command use this database.
        """
        return f"{self.vkey} {self.url}"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def go_env(home: str, **extra: str) -> dict[str, str]:
    """
    An environment for the go command isolated from the machine's: its own
    module cache, build cache and settings.
    """
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("GO") and k not in ("CGO_ENABLED",)
    }
    env.update({
        "HOME": home,
        "GOPATH": os.path.join(home, "gopath"),
        "GOMODCACHE": os.path.join(home, "modcache"),
        "GOCACHE": os.path.join(home, "gocache"),
        "GOENV": os.path.join(home, "goenv"),
        "GOFLAGS": "-mod=mod",
        "GONOSUMDB": "",
        "GOPRIVATE": "",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    })
    env.update(extra)
    return env


def iter_tree(root: str) -> Iterator[str]:
    for directory, _, files in os.walk(root):
        for name in files:
            yield os.path.relpath(os.path.join(directory, name), root)
