"""
C{contentcache warm FILE...}: fill a running cache with what lockfiles
name, before the network goes, and check it against the lockfiles' own
hashes.

Read here: npm's C{package-lock.json} and C{npm-shrinkwrap.json}
(lockfile versions 1 to 3), C{pnpm-lock.yaml} (6 to 9, with PyYAML),
C{yarn.lock} (yarn 1 and berry), and the go command's C{go.sum} and
C{go.mod}.
Each item is asked for through the cache (packuments and tarballs; C{.info},
C{.mod} and C{.zip}), N at a time; a tarball is checked against the
lockfile's C{integrity}, a module's zip and go.mod against C{go.sum}'s
C{h1:} lines. A plain command: threads and blocking HTTP, no reactor.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TextIO
from urllib.parse import quote, urlsplit

from attrs import define, field, frozen

from .protocol.goproxy.modzip import ZipRuleError, check_and_hash_zip, hash_go_mod
from .protocol.goproxy.paths import escape

#: Bytes read at a time from a response.
CHUNK = 1 << 20
TIMEOUT = 300


class WarmError(Exception):
    """
    A lockfile that cannot be read, in one sentence.
    """


@frozen
class Item:
    """
    One thing to ask the cache for: its path under the cache's address, and
    how to check what comes back (L{None}: nothing to check it against).
    """

    path: str
    #: "sri:<integrity>", "h1-zip|<module>|<version>|<h1>", "h1-mod:<h1>"
    check: str | None = None
    what: str = ""


@define
class Tally:
    cached: int = 0
    fetched: int = 0
    failed: list[str] = field(factory=list)
    mismatched: list[str] = field(factory=list)
    lock: threading.Lock = field(factory=threading.Lock)

    @property
    def done(self) -> int:
        return self.cached + self.fetched + len(self.failed) + len(self.mismatched)


# Lockfiles.

def _npm_path(name: str) -> str:
    return "/npm/" + (quote(name, safe="@") if name.startswith("@") else quote(name, safe=""))


def _npm_items(name: str, version: str, integrity: str | None) -> list[Item]:
    base = name.rsplit("/", 1)[-1]
    tarball = f"/npm/{name}/-/{base}-{version}.tgz"
    return [Item(_npm_path(name), None, f"{name} packument"),
            Item(tarball, f"sri:{integrity}" if integrity else None, f"{name}@{version}")]


def npm_lockfile(path: str, text: str) -> Iterator[Item]:
    try:
        document = json.loads(text)
    except ValueError:
        raise WarmError(f"{path} is not JSON.") from None
    if not isinstance(document, dict):
        raise WarmError(f"{path} is not an npm lockfile.")
    seen: set[tuple[str, str]] = set()
    packages = document.get("packages")
    if isinstance(packages, dict):  # lockfile versions 2 and 3
        for where, info in packages.items():
            if not where or not isinstance(info, dict) or info.get("link") or "version" not in info:
                continue
            name = info.get("name") or where.rsplit("node_modules/", 1)[-1]
            if (name, info["version"]) not in seen:
                seen.add((name, info["version"]))
                yield from _npm_items(name, info["version"], info.get("integrity"))
        return

    def walk(dependencies: object) -> Iterator[Item]:  # lockfile version 1
        if not isinstance(dependencies, dict):
            return
        for name, info in dependencies.items():
            if not isinstance(info, dict) or "version" not in info or str(info["version"]).startswith("file:"):
                continue
            if (name, info["version"]) not in seen:
                seen.add((name, info["version"]))
                yield from _npm_items(name, info["version"], info.get("integrity"))
            yield from walk(info.get("dependencies"))

    yield from walk(document.get("dependencies"))


def go_sum(path: str, text: str) -> Iterator[Item]:
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or not fields[2].startswith("h1:"):
            raise WarmError(f"{path}, line {number}: not a go.sum line.")
        module, version, h1 = fields
        base = f"/goproxy/{escape(module)}/@v/"
        if version.endswith("/go.mod"):
            version = version.removesuffix("/go.mod")
            yield Item(f"{base}{escape(version)}.info", None, f"{module}@{version} .info")
            yield Item(f"{base}{escape(version)}.mod", f"h1-mod:{h1}", f"{module}@{version} go.mod")
        else:
            yield Item(f"{base}{escape(version)}.zip", f"h1-zip|{module}|{version}|{h1}", f"{module}@{version}")


def go_mod(path: str, text: str) -> Iterator[Item]:
    block = False
    for line in text.splitlines():
        line = line.split("//", 1)[0].strip()
        if line.startswith("require ("):
            block = True
            continue
        if block and line == ")":
            block = False
            continue
        m = re.fullmatch(r"(?:require\s+)?(\S+)\s+(v\S+)", line) if (block or line.startswith("require ")) else None
        if m:
            module, version = m[1], m[2]
            base = f"/goproxy/{escape(module)}/@v/{escape(version)}"
            yield Item(f"{base}.info", None, f"{module}@{version} .info")
            yield Item(f"{base}.mod", None, f"{module}@{version} go.mod")


def _name_version(spec: str) -> tuple[str, str] | None:
    """
    "name@version" (a scope's @ first) as its two parts.
    """
    at = spec.rfind("@")
    if at <= 0:
        return None
    return spec[:at], spec[at + 1:]


def pnpm_lockfile(path: str, text: str) -> Iterator[Item]:
    """
    pnpm-lock.yaml, versions 6 to 9: each package's key names it and its
    version ("/name@1.0.0", "name@1.0.0(peer@2)"), with its tarball's
    integrity under resolution.
    """
    import yaml

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        raise WarmError(f"{path} is not YAML.") from None
    packages = document.get("packages") if isinstance(document, dict) else None
    if not isinstance(packages, dict):
        return
    for key, info in packages.items():
        spec = str(key).lstrip("/").split("(", 1)[0]
        parsed = _name_version(spec)
        if parsed is None:
            continue
        name, version = parsed
        resolution = info.get("resolution") if isinstance(info, dict) else None
        if isinstance(resolution, dict) and "tarball" in resolution and "integrity" not in resolution:
            continue  # a tarball from elsewhere (a URL or a file): not the registry's
        integrity = resolution.get("integrity") if isinstance(resolution, dict) else None
        yield from _npm_items(name, version, integrity)


def yarn_lockfile(path: str, text: str) -> Iterator[Item]:
    """
    yarn.lock: yarn 1's own format, with each tarball's integrity, or yarn
    berry's YAML, whose checksum is of its own zip (so its packages are only
    fetched, not checked).
    """
    if "__metadata:" in text:
        import yaml

        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError:
            raise WarmError(f"{path} is not YAML.") from None
        for key, info in (document or {}).items():
            if key == "__metadata" or not isinstance(info, dict):
                continue
            resolution = str(info.get("resolution", ""))
            parsed = _name_version(resolution.replace("@npm:", "@", 1)) if "@npm:" in resolution else None
            if parsed is not None:
                yield from _npm_items(parsed[0], parsed[1], None)
        return
    entry: dict[str, str] = {}
    names: list[str] = []

    def flush() -> Iterator[Item]:
        if names and "version" in entry:
            name = names[0].rsplit("@", 1)[0] if names[0].count("@") > (1 if names[0].startswith("@") else 0) \
                else names[0]
            yield from _npm_items(name, entry["version"], entry.get("integrity"))

    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if not line.startswith(" "):
            yield from flush()
            entry, names = {}, [n.strip().strip('"') for n in line.rstrip(":").split(",")]
        else:
            m = re.fullmatch(r"\s+(version|integrity|resolved)\s+\"?([^\"]+)\"?", line)
            if m:
                entry[m[1]] = m[2]
    yield from flush()


READERS: dict[str, Callable[[str, str], Iterator[Item]]] = {
    "package-lock.json": npm_lockfile,
    "npm-shrinkwrap.json": npm_lockfile,
    "pnpm-lock.yaml": pnpm_lockfile,
    "yarn.lock": yarn_lockfile,
    "go.sum": go_sum,
    "go.mod": go_mod,
}


def items_of(paths: list[str]) -> list[Item]:
    found: dict[str, Item] = {}
    for path in paths:
        reader = READERS.get(os.path.basename(path))
        if reader is None:
            raise WarmError(f"{path}: not a lockfile this reads ({', '.join(READERS)}).")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise WarmError(f"Cannot read {path}: {e.strerror}.") from None
        for item in reader(path, text):
            # One ask per path; the one with something to check wins.
            if item.path not in found or (found[item.path].check is None and item.check is not None):
                found[item.path] = item
    return list(found.values())


# Asking the cache.

def _check(item: Item, spool: str, digests: dict[str, Any]) -> str | None:
    """
    Why what came back does not match, or L{None}.
    """
    check = item.check
    if check is None:
        return None
    if check.startswith("sri:"):
        for part in check[4:].split():
            algorithm, _, expected = part.partition("-")
            digest = digests.get(algorithm)
            if digest is not None:
                got = base64.b64encode(digest.digest()).decode()
                return None if got == expected else f"integrity {algorithm}-{got}, the lockfile says {part}"
        return None  # no algorithm we hash
    if check.startswith("h1-mod:"):
        got = hash_go_mod(spool)
        return None if got == check[7:] else f"{got}, go.sum says {check[7:]}"
    _, module, version, h1 = check.split("|")
    try:
        got = check_and_hash_zip(spool, module, version)
    except ZipRuleError as e:
        return f"not a module zip: {e}"
    return None if got == h1 else f"{got}, go.sum says {h1}"


def fetch(url: str, item: Item, token: str | None, directory: str) -> tuple[str, str | None]:
    """
    Ask the cache for C{item}: ("cached" | "fetched", None), or
    ("failed" | "mismatched", why).
    """
    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname or "localhost", parts.port, timeout=TIMEOUT)
    headers = {"Accept-Encoding": "identity"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    prefix = parts.path.rstrip("/")
    try:
        connection.request("GET", prefix + item.path, headers=headers)
        response = connection.getresponse()
        digests = {"sha512": hashlib.sha512(), "sha256": hashlib.sha256(), "sha1": hashlib.sha1()}
        with tempfile.NamedTemporaryFile(dir=directory, delete=False) as spool:
            while chunk := response.read(CHUNK):
                spool.write(chunk)
                if item.check and item.check.startswith("sri:"):
                    for digest in digests.values():
                        digest.update(chunk)
        try:
            if response.status != 200:
                first = open(spool.name, "rb").read(200).decode("utf-8", "replace").strip().splitlines()
                return "failed", f"{response.status} {first[0] if first else ''}".strip()
            why = _check(item, spool.name, digests)
        finally:
            os.unlink(spool.name)
    except (OSError, http.client.HTTPException) as e:
        return "failed", f"{type(e).__name__}: {e}"
    finally:
        connection.close()
    if why is not None:
        return "mismatched", why
    return ("cached" if response.getheader("x-cache") == "HIT" else "fetched"), None


def warm(paths: list[str], url: str, token: str | None, jobs: int, out: TextIO = sys.stderr) -> Tally:
    items = items_of(paths)
    tally = Tally()
    tty = out.isatty()
    started = time.monotonic()

    def one(item: Item) -> None:
        outcome, why = fetch(url, item, token, directory)
        with tally.lock:
            if outcome == "cached":
                tally.cached += 1
            elif outcome == "fetched":
                tally.fetched += 1
            elif outcome == "failed":
                tally.failed.append(f"{item.what or item.path}: {why}")
            else:
                tally.mismatched.append(f"{item.what or item.path}: {why}")
            done = tally.done
            if tty:
                out.write(f"\rwarming: {done}/{len(items)}")
                out.flush()
            elif done % 100 == 0:
                print(f"warming: {done}/{len(items)}", file=out)

    with tempfile.TemporaryDirectory(prefix="contentcache-warm-") as directory:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(one, items))
    if tty:
        out.write("\n")
    tally_seconds = time.monotonic() - started
    for line in tally.failed:
        print(f"failed: {line}", file=out)
    for line in tally.mismatched:
        print(f"MISMATCH: {line}", file=out)
    print(f"{len(items)} items: {tally.cached} already cached, {tally.fetched} fetched, "
          f"{len(tally.failed)} failed, {len(tally.mismatched)} mismatched ({tally_seconds:.1f} s)",
          file=out)
    return tally
