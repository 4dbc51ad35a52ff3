"""
Compression of what a package cache holds, by the store's policy.

Generates a corpus shaped like what a cache of npm and Go modules holds
(npm packuments of 10 to 9,000 versions, go.mod and .info files, npm
tarballs and Go module zips), compresses each kind by the store's policy
at zstd levels 1, 3, 9 and 19 and prints what the store decided, the
ratio, and encode and decode MB/s; then it puts the whole corpus through a
store with and without compression, on the filesystem and on S3 (a local
SeaweedFS, C{weed mini} on 127.0.0.1), reads it back and prints logical
against stored bytes.

Run it from the repository root::

    python bench/compression.py            # full size, under two minutes
    python bench/compression.py --quick    # a smoke run, about 25 seconds
    python bench/compression.py --no-s3    # without SeaweedFS

The corpus is the same on every run and reaches nothing but 127.0.0.1.
The stores run as the daemon runs them: the real reactor, blocking file
and S3 work on the L{DiskPool}. The storage and SeaweedFS's data live in a
temporary directory that is always removed; SeaweedFS is always stopped.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import itertools
import json
import os
import random
import statistics
import tarfile
import time
import zipfile
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator, Sequence

from attrs import frozen

# First: it puts the repository on the path for the tests' helpers.
from common import (
    MB, PUT_CHUNK, S3_PREFIX, Reactor, S3Server, check_dir, human, make_store, print_setup,
    react_on_storage, start_disk_pool, store_parser,
)
from contentcache.compress import DEFAULT_LEVEL, IDENTITY, Compression, decode, decoder
from contentcache.pool import DiskPool
from contentcache.store import BLOB_PREFIX, Blob, Store
from contentcache.web import CHUNK_SIZE

#: The zstd levels of the compression table: fast, the store's default,
#: and two slower ones.
LEVELS = (1, DEFAULT_LEVEL, 9, 19)
#: Same seed, same corpus: runs compare.
SEED = 20251124
#: A codec measurement repeats until it has taken this long, at least once:
#: level 19 on the biggest packument takes seconds by itself.
CODEC_TARGET_SECONDS = 0.5
QUICK_CODEC_TARGET_SECONDS = 0.1


# The corpus: what a cache of npm and Go modules holds, generated (the
# benchmark reaches nothing but 127.0.0.1). What makes a ratio is kept
# real: the registry's compact JSON, manifests that change little from one
# version to the next, and per version the digests, signatures and commit
# hashes that no compressor can shrink.

COMMON_WORDS = """
the of and to a in is it you that he was for on are with as his they be at one have this from
or had by not word but what some we can out other were all there when up use your how said an
each she which do their time if will way about many then them write would like so these her
long make thing see him two has look more day could go come did number no most people my over
know than call first who may down side been now find any new work part take get place made
where after back little only round year came show every good me give our under name very
through just form great think say help low line differ turn cause much mean before move right
old too same tell does set three want well also play small end put home read hand large add even
here must big high such follow act why ask change went light kind off need try again point world
near build self should return value option default error function object string number array
module package install cache request response server client stream buffer config version build
test run file path type data event handler callback promise async await export import require
""".split()
#: Syllables of the made-up words that make the vocabulary's long tail.
SYLLABLES = tuple(c + v for c in "bcdfghklmnprstvwz" for v in "aeiou") + ("ing", "er", "tion", "ly")
VOCABULARY_SIZE = 3000


def vocabulary(rng: random.Random) -> tuple[list[str], list[float]]:
    """
    Words, the common ones first, and their cumulative Zipf weights: text
    drawn from them compresses about as English prose does.
    """
    words = list(dict.fromkeys(COMMON_WORDS))
    seen = set(words)
    while len(words) < VOCABULARY_SIZE:
        word = "".join(rng.choices(SYLLABLES, k=rng.choice((1, 2, 2, 3, 3, 4))))
        if word not in seen:
            seen.add(word)
            words.append(word)
    weights = list(itertools.accumulate(1 / (rank + 1) ** 1.05 for rank in range(len(words))))
    return words, weights


WORDS, WEIGHTS = vocabulary(random.Random(SEED))


def words(rng: random.Random, count: int) -> list[str]:
    return rng.choices(WORDS, cum_weights=WEIGHTS, k=count)


def prose(rng: random.Random, count: int) -> str:
    """
    About C{count} words in sentences.
    """
    sentences = []
    while count > 0:
        length = min(count, rng.randint(5, 22))
        count -= length
        sentence = " ".join(words(rng, length))
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice("......?!"))
    return " ".join(sentences)


def identifier(rng: random.Random) -> str:
    parts = words(rng, rng.randint(1, 3))
    return parts[0] + "".join(part.capitalize() for part in parts[1:])


def hex_digits(rng: random.Random, count: int) -> str:
    return rng.randbytes((count + 1) // 2).hex()[:count]


def slug(rng: random.Random) -> str:
    return "-".join(words(rng, rng.randint(1, 2))).lower()


# npm packuments, shaped as the public npm registry sends them (compact JSON).

NPM_DEPENDENCIES = """
@babel/runtime @babel/core @types/node @types/react ajv ansi-styles axios body-parser chalk
chokidar classnames commander cookie core-js cross-spawn debug dotenv escape-string-regexp
eventemitter3 express fast-glob fs-extra glob graceful-fs iconv-lite inherits js-yaml json5
lodash lru-cache mime mime-types minimatch minimist mkdirp ms node-fetch object-assign once
picocolors postcss prop-types qs react react-dom readable-stream resolve rimraf rxjs
safe-buffer semver source-map string-width strip-ansi supports-color through2 tslib
type-fest uuid webpack ws yallist yargs zod @aws-sdk/client-s3 @smithy/types date-fns
""".split()
NPM_DEV_DEPENDENCIES = """
@types/jest @types/mocha @typescript-eslint/parser @typescript-eslint/eslint-plugin c8 chai
eslint eslint-config-prettier husky jest lint-staged mocha nyc prettier rollup sinon tap
ts-node tsup typescript vitest @rollup/plugin-node-resolve standard xo ava
""".split()
LICENSES = ("MIT", "MIT", "MIT", "ISC", "Apache-2.0", "BSD-3-Clause", "BSD-2-Clause")
#: npm's registry signing key, in every dist's signatures.
KEY_ID = "SHA256:jl3bwswu80PjjokCgh0o2w5c2U4LhQAE57gj9cz1kzA"
#: A registry-shaped address for the tarball URLs, never a real registry's.
REGISTRY = "https://registry.example.org"


def person(rng: random.Random) -> dict[str, str]:
    name = "".join(words(rng, rng.randint(1, 2))).lower()
    return {"name": name, "email": f"{name}@{rng.choice(('gmail.com', 'example.com', 'users.noreply.github.com'))}"}


def version_range(rng: random.Random) -> str:
    major, minor, patch = rng.choice((0, 1, 1, 2, 3, 4, 5, 7)), rng.randint(0, 30), rng.randint(0, 20)
    return rng.choice(("^", "^", "^", "~", ">=", "")) + f"{major}.{minor}.{patch}"


def npm_versions(rng: random.Random, count: int) -> Iterator[str]:
    """
    C{count} increasing versions: mostly patches, some minors, now and
    then a major, each minor or major now and then preceded by prereleases.
    """
    major, minor, patch = rng.choice(((0, 1, 0), (1, 0, 0)))
    yielded = 0
    while yielded < count:
        roll = rng.random()
        if roll < 0.03:
            major, minor, patch = major + 1, 0, 0
        elif roll < 0.2:
            minor, patch = minor + 1, 0
        else:
            patch += 1
        if patch == 0 and rng.random() < 0.3:
            for tag in ("alpha", "beta", "rc")[rng.randrange(3):]:
                for n in range(rng.randint(1, 4)):
                    if yielded < count - 1:
                        yield f"{major}.{minor}.{patch}-{tag}.{n}"
                        yielded += 1
        yield f"{major}.{minor}.{patch}"
        yielded += 1


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def readme(rng: random.Random, name: str, size: int) -> str:
    repository = f"https://git.example.org/{name.lstrip('@')}"
    parts = [
        f"# {name}\n\n[![npm](https://img.shields.io/npm/v/{name}.svg)](https://www.npmjs.com/package/{name}) "
        f"[![CI]({repository}/actions/workflows/ci.yml/badge.svg)]({repository}/actions)\n\n"
        f"{prose(rng, 40)}\n\n## Install\n\n```sh\nnpm install {name}\n```\n\n## Usage\n\n"
        f"```js\nconst {{ {identifier(rng)} }} = require('{name}');\n```\n\n## API\n"
    ]
    while sum(map(len, parts)) < size:
        arguments = ", ".join(identifier(rng) for _ in range(rng.randint(0, 3)))
        parts.append(f"\n### {identifier(rng)}({arguments})\n\n{prose(rng, rng.randint(20, 120))}\n")
        if rng.random() < 0.3:
            parts.append(f"\n```js\nconst {identifier(rng)} = await {identifier(rng)}({{ "
                         f"{identifier(rng)}: {rng.randint(0, 1000)} }});\n```\n")
    parts.append(f"\n## License\n\n{rng.choice(LICENSES)}\n")
    return "".join(parts)


def signature(rng: random.Random) -> str:
    """
    An ECDSA P-256 signature in DER, base64: random, as far as zstd sees.
    """
    return base64.b64encode(b"\x30\x45\x02\x21\x00" + rng.randbytes(32) + b"\x02\x20" + rng.randbytes(32)).decode()


@frozen
class Lineage:
    """
    What a package's manifests share from one version to the next, and
    change now and then.
    """

    dependencies: dict[str, str]
    dev_dependencies: dict[str, str]
    peer_dependencies: dict[str, str]
    scripts: dict[str, str]
    description: str
    keywords: list[str]
    engines: dict[str, str]
    tools: tuple[str, str]

    @classmethod
    def first(cls, rng: random.Random) -> Lineage:
        return cls(
            {name: version_range(rng) for name in sorted(rng.sample(NPM_DEPENDENCIES, rng.randint(0, 14)))},
            {name: version_range(rng) for name in sorted(rng.sample(NPM_DEV_DEPENDENCIES, rng.randint(2, 14)))},
            {"react": ">=16.8.0"} if rng.random() < 0.1 else {},
            {
                "build": rng.choice(("tsc -p tsconfig.build.json", "rollup -c", "tsup src/index.ts --dts")),
                "test": rng.choice(("mocha", "jest --coverage", "vitest run", "tap test/*.js", "node --test")),
                "lint": "eslint .",
                **({"prepublishOnly": "npm run build && npm test"} if rng.random() < 0.5 else {}),
            },
            prose(rng, rng.randint(5, 20)),
            words(rng, rng.randint(0, 10)),
            {"node": ">=" + rng.choice(("0.10", "4", "6", "8", "10", "12", "14", "16", "18"))},
            ("4.2.1", "2.14.7"),
        )

    def next(self, rng: random.Random) -> Lineage:
        """
        The lineage of the next version: a dependency bumped, added or
        dropped now and then, dev dependencies bumped more often.
        """
        dependencies = dict(self.dependencies)
        dev_dependencies = dict(self.dev_dependencies)
        if dependencies and rng.random() < 0.15:
            dependencies[rng.choice(list(dependencies))] = version_range(rng)
        if rng.random() < 0.03:
            dependencies[rng.choice(NPM_DEPENDENCIES)] = version_range(rng)
            dependencies = dict(sorted(dependencies.items()))
        if dependencies and rng.random() < 0.02:
            del dependencies[rng.choice(list(dependencies))]
        if rng.random() < 0.35:
            dev_dependencies[rng.choice(list(dev_dependencies))] = version_range(rng)
        node, npm = self.tools
        if rng.random() < 0.05:
            node, npm = f"{rng.randint(4, 22)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}", version_range(rng).lstrip("^~>=")
        return Lineage(
            dependencies, dev_dependencies, self.peer_dependencies, self.scripts,
            prose(rng, rng.randint(5, 20)) if rng.random() < 0.02 else self.description,
            self.keywords, self.engines, (node, npm),
        )


def manifest(
    rng: random.Random, name: str, version: str, when: datetime, lineage: Lineage, common: dict[str, Any],
    maintainers: list[dict[str, str]],
) -> dict[str, Any]:
    """
    One version's document as the registry holds it in the packument.
    """
    basename = name.rsplit("/", 1)[-1]
    shasum = hex_digits(rng, 40)
    dist: dict[str, Any] = {
        "integrity": "sha512-" + base64.b64encode(rng.randbytes(64)).decode(),
        "shasum": shasum,
        "tarball": f"{REGISTRY}/{name}/-/{basename}-{version}.tgz",
        "fileCount": rng.randint(5, 400),
        "unpackedSize": rng.randint(2_000, 3_000_000),
    }
    if when.year >= 2018:
        dist["signatures"] = [{"keyid": KEY_ID, "sig": signature(rng)}]
    if when.year >= 2023 and common.get("provenance"):
        dist["attestations"] = {
            "url": f"{REGISTRY}/-/npm/v1/attestations/{name}@{version}",
            "provenance": {"predicateType": "https://slsa.dev/provenance/v1"},
        }
    node, npm = lineage.tools
    document: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": lineage.description,
        "main": common["main"],
        **({"types": common["types"]} if "types" in common else {}),
        "scripts": lineage.scripts,
        "repository": common["repository"],
        "keywords": lineage.keywords,
        "author": common["author"],
        "license": common["license"],
        "bugs": common["bugs"],
        "homepage": common["homepage"],
        "engines": lineage.engines,
        "dependencies": lineage.dependencies,
        "devDependencies": lineage.dev_dependencies,
        **({"peerDependencies": lineage.peer_dependencies} if lineage.peer_dependencies else {}),
        "gitHead": hex_digits(rng, 40),
        "_id": f"{name}@{version}",
        "_nodeVersion": node,
        "_npmVersion": npm,
        "dist": dist,
        "_npmUser": rng.choice(maintainers),
        "directories": {},
        "maintainers": maintainers,
        "_npmOperationalInternal": {
            "host": "s3://npm-registry-packages",
            "tmp": f"tmp/{basename}_{version}_{int(when.timestamp() * 1000)}_0.{rng.randrange(10**16):016d}",
        },
        "_hasShrinkwrap": False,
    }
    if when.year < 2017:
        document["_shasum"] = shasum
        document["_from"] = "."
    return document


def packument(rng: random.Random, count: int) -> bytes:
    """
    A package's full packument with C{count} versions: the latest's readme
    at the top, every version's manifest, the publication times.
    """
    scope = f"@{slug(rng)}/" if rng.random() < 0.3 else ""
    name = scope + slug(rng)
    owner = scope.strip("@/") or "".join(words(rng, 1)).lower()
    repository = f"https://git.example.org/{owner}/{name.rsplit('/', 1)[-1]}"
    maintainers = [person(rng) for _ in range(rng.randint(1, 4))]
    common = {
        "main": rng.choice(("index.js", "lib/index.js", "dist/index.cjs", "./dist/index.js")),
        "repository": {"type": "git", "url": f"git+{repository}.git"},
        "author": maintainers[0],
        "license": rng.choice(LICENSES),
        "bugs": {"url": f"{repository}/issues"},
        "homepage": f"{repository}#readme",
        "provenance": rng.random() < 0.3,
    }
    if rng.random() < 0.5:
        common["types"] = "index.d.ts"
    lineage = Lineage.first(rng)
    # Some years of releases, whatever their number: a big package
    # publishes nightly, a small one now and then.
    when = datetime(2012, 1, 1, tzinfo=timezone.utc) + timedelta(days=rng.uniform(0, 3000))
    mean_gap = min(60.0, 3000 / count)
    created = when
    versions: dict[str, Any] = {}
    times: dict[str, str] = {}
    latest = ""
    for version in npm_versions(rng, count):
        lineage = lineage.next(rng)
        versions[version] = manifest(rng, name, version, when, lineage, common, maintainers)
        times[version] = iso(when)
        if "-" not in version:
            latest = version
        when += timedelta(days=rng.expovariate(1 / mean_gap))
    tags = {"latest": latest or version}
    if "-" in version:
        tags["next"] = version
    document: dict[str, Any] = {
        "_id": name,
        "_rev": f"{count + rng.randint(0, 50)}-{hex_digits(rng, 32)}",
        "name": name,
        "description": lineage.description,
        "dist-tags": tags,
        "versions": versions,
        "time": {"created": iso(created), "modified": iso(when), **times},
        "maintainers": maintainers,
        "author": common["author"],
        "repository": common["repository"],
        "homepage": common["homepage"],
        "keywords": lineage.keywords,
        "bugs": common["bugs"],
        "license": common["license"],
        "readme": readme(rng, name, rng.randint(1_000, 40_000)),
        "readmeFilename": "README.md",
    }
    if rng.random() < 0.5:
        document["users"] = {"".join(words(rng, 2)).lower(): True for _ in range(rng.randint(1, 300))}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# Go modules: go.mod (what the proxy serves as .mod) and .info.

GO_MODULES = """
github.com/stretchr/testify github.com/davecgh/go-spew github.com/pmezard/go-difflib
gopkg.in/yaml.v3 gopkg.in/yaml.v2 golang.org/x/net golang.org/x/sys golang.org/x/text
golang.org/x/crypto golang.org/x/sync golang.org/x/mod golang.org/x/tools golang.org/x/oauth2
golang.org/x/term golang.org/x/time golang.org/x/exp google.golang.org/grpc
google.golang.org/protobuf google.golang.org/genproto/googleapis/rpc
google.golang.org/genproto/googleapis/api github.com/golang/protobuf github.com/google/go-cmp
github.com/google/uuid github.com/spf13/cobra github.com/spf13/pflag github.com/spf13/viper
github.com/sirupsen/logrus go.uber.org/zap go.uber.org/multierr go.uber.org/atomic
github.com/pkg/errors github.com/prometheus/client_golang github.com/prometheus/client_model
github.com/prometheus/common github.com/prometheus/procfs github.com/beorn7/perks
github.com/cespare/xxhash/v2 github.com/gorilla/mux github.com/gin-gonic/gin
github.com/go-logr/logr github.com/go-logr/stdr go.opentelemetry.io/otel
go.opentelemetry.io/otel/trace go.opentelemetry.io/otel/metric k8s.io/apimachinery
k8s.io/client-go k8s.io/api k8s.io/klog/v2 k8s.io/utils sigs.k8s.io/yaml
sigs.k8s.io/structured-merge-diff/v4 github.com/json-iterator/go github.com/modern-go/reflect2
github.com/mattn/go-isatty github.com/mattn/go-colorable github.com/fsnotify/fsnotify
github.com/hashicorp/go-multierror github.com/hashicorp/errwrap github.com/hashicorp/hcl
github.com/aws/aws-sdk-go-v2 github.com/aws/smithy-go github.com/klauspost/compress
github.com/golang/snappy github.com/inconshreveable/mousetrap github.com/kr/pretty
github.com/kr/text github.com/rogpeppe/go-internal github.com/go-sql-driver/mysql
github.com/lib/pq github.com/jackc/pgx/v5 github.com/redis/go-redis/v9
cloud.google.com/go/compute/metadata github.com/munnerz/goautoneg github.com/gogo/protobuf
""".split()
GO_RELEASES = ("1.13", "1.16", "1.17", "1.18", "1.19", "1.20", "1.21.0", "1.21.5", "1.22.0", "1.22.5", "1.23.0")


def go_module_path(rng: random.Random) -> str:
    host = rng.choice(("github.com", "github.com", "github.com", "gitlab.com", "go.{}.io", "{}.dev"))
    if "{}" in host:
        return host.format(slug(rng)) + "/" + slug(rng)
    return f"{host}/{slug(rng)}/{slug(rng)}"


def go_version(rng: random.Random, when: datetime) -> str:
    roll = rng.random()
    if roll < 0.25:
        stamp = when - timedelta(days=rng.uniform(0, 2000))
        return f"v0.0.0-{stamp:%Y%m%d%H%M%S}-{hex_digits(rng, 12)}"
    if roll < 0.28:
        return f"v{rng.randint(2, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}+incompatible"
    return f"v{rng.choice((0, 0, 1, 1, 1, 2))}.{rng.randint(0, 60)}.{rng.randint(0, 30)}"


def go_mod(rng: random.Random) -> bytes:
    """
    A go.mod: the module, its go directive, 5 to 60 requirements (direct
    and indirect blocks from go 1.17 on), now and then replace, exclude
    and retract directives.
    """
    when = datetime(2024, 6, 1, tzinfo=timezone.utc)
    module = go_module_path(rng)
    go = rng.choice(GO_RELEASES)
    count = rng.randint(5, 60)
    known = rng.sample(GO_MODULES, min(count, rng.randint(count // 2, count)))
    paths = sorted(set(known + [go_module_path(rng) for _ in range(count - len(known))]))
    direct = set(rng.sample(paths, max(1, len(paths) // rng.randint(2, 5))))
    lines = [f"module {module}", "", f"go {go}"]
    if go.count(".") == 2 and rng.random() < 0.4:
        lines.append(f"\ntoolchain go{go[:-1]}{rng.randint(1, 9)}")
    lines.append("")

    def requirement(path: str) -> str:
        return f"\t{path} {go_version(rng, when)}" + ("" if path in direct else " // indirect")

    split = go.count(".") == 2 or go >= "1.17"
    blocks = [sorted(direct), sorted(set(paths) - direct)] if split else [paths]
    for block in blocks:
        if block:
            lines += ["require (", *(requirement(path) for path in block), ")", ""]
    if rng.random() < 0.2:
        for path in rng.sample(paths, min(len(paths), rng.randint(1, 3))):
            target = rng.choice((f"../{slug(rng)}", f"{go_module_path(rng)} {go_version(rng, when)}"))
            lines.append(f"replace {path} => {target}")
        lines.append("")
    if rng.random() < 0.1:
        for path in rng.sample(paths, min(len(paths), rng.randint(1, 2))):
            lines.append(f"exclude {path} {go_version(rng, when)}")
        lines.append("")
    if rng.random() < 0.05:
        lines.append(f"// {prose(rng, 8)}\nretract v{rng.randint(0, 2)}.{rng.randint(0, 9)}.0")
    return ("\n".join(lines).rstrip("\n") + "\n").encode("utf-8")


def go_info(rng: random.Random) -> bytes:
    """
    A version's .info as the public Go module proxy serves it; the newer ones say
    where the version came from.
    """
    when = datetime(2019, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=rng.uniform(0, 5.5 * 365 * 86400))
    version = go_version(rng, when)
    info: dict[str, Any] = {"Version": version, "Time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if rng.random() < 0.4:
        path = go_module_path(rng)
        info["Origin"] = {"VCS": "git", "URL": f"https://{path}", "Hash": hex_digits(rng, 40),
                          **({} if version.startswith("v0.0.0-") else {"Ref": f"refs/tags/{version}"})}
    return json.dumps(info, separators=(",", ":")).encode("ascii")


# Archives, compressed already: the store must keep them as they come.


def javascript(rng: random.Random, size: int) -> str:
    """
    About C{size} characters of JavaScript-like source.
    """
    lines = ["'use strict';", ""]
    for _ in range(rng.randint(1, 6)):
        lines.append(f"const {identifier(rng)} = require('{rng.choice(NPM_DEPENDENCIES)}');")
    while sum(map(len, lines)) < size:
        name, arguments = identifier(rng), [identifier(rng) for _ in range(rng.randint(0, 3))]
        lines += ["", f"/**\n * {prose(rng, rng.randint(6, 30))}\n */",
                  f"function {name}({', '.join(arguments)}) {{"]
        for _ in range(rng.randint(2, 14)):
            a, b = identifier(rng), identifier(rng)
            lines.append(rng.choice((
                f"  const {a} = {b}.{identifier(rng)}({rng.randint(0, 100)});",
                f"  if (!{a}) {{\n    throw new TypeError('{prose(rng, 4)}');\n  }}",
                f"  for (const {a} of {b}) {{\n    {identifier(rng)}.push({a});\n  }}",
                f"  return {a} === undefined ? {b} : {a};",
                f"  {a}.{identifier(rng)} = '{'-'.join(words(rng, 2))}';",
            )))
        lines += ["}", f"module.exports.{name} = {name};"]
    return "\n".join(lines) + "\n"


def go_source(rng: random.Random, package: str, size: int) -> str:
    """
    About C{size} characters of Go-like source.
    """
    lines = [f"// Package {package} {prose(rng, 12)}", f"package {package}", "", "import (",
             '\t"errors"', '\t"fmt"', ")"]
    while sum(map(len, lines)) < size:
        name = identifier(rng)
        lines += ["", f"// {name.capitalize()} {prose(rng, rng.randint(6, 30))}",
                  f"func {name.capitalize()}({identifier(rng)} string, {identifier(rng)} int) error {{"]
        for _ in range(rng.randint(2, 12)):
            a = identifier(rng)
            lines.append(rng.choice((
                f"\t{a} := {identifier(rng)}({rng.randint(0, 100)})",
                f'\tif {a} == nil {{\n\t\treturn errors.New("{prose(rng, 4)}")\n\t}}',
                f'\tfmt.Printf("%s: %d\\n", {a}, {rng.randint(0, 1 << 16)})',
                f"\tfor _, {a} := range {identifier(rng)} {{\n\t\t_ = {a}\n\t}}",
            )))
        lines += ["\treturn nil", "}"]
    return "\n".join(lines) + "\n"


def npm_tarball(rng: random.Random) -> bytes:
    """
    An npm package's .tgz: a gzipped tar of C{package/...}, a package.json,
    a readme and some JavaScript files, now and then a binary asset.
    """
    name = slug(rng)
    files = {
        "package/package.json": json.dumps({"name": name, "version": f"1.{rng.randint(0, 30)}.0",
                                            "main": "lib/index.js", "license": "MIT"}, indent=2),
        "package/README.md": readme(rng, name, rng.randint(1_000, 20_000)),
    }
    for _ in range(rng.randint(1, 40)):
        files[f"package/lib/{identifier(rng)}.js"] = javascript(rng, int(rng.lognormvariate(8.5, 1.2)))
    contents = {path: text.encode("utf-8") for path, text in files.items()}
    if rng.random() < 0.3:
        contents["package/assets/logo.png"] = rng.randbytes(rng.randint(2_000, 200_000))
    out = io.BytesIO()
    # No time in the gzip header: the same tarball on every run.
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as archive:
        for path, content in contents.items():
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(content), 499162500, 0o644
            archive.addfile(info, io.BytesIO(content))
    return out.getvalue()


def go_zip(rng: random.Random) -> bytes:
    """
    A Go module version's .zip as the proxy serves it: every file under
    C{module@version/}, deflated.
    """
    module, version = go_module_path(rng), f"v1.{rng.randint(0, 30)}.{rng.randint(0, 9)}"
    prefix = f"{module}@{version}/"
    files = {"go.mod": go_mod(rng), "LICENSE": prose(rng, 200).encode(), "README.md": prose(rng, 400).encode()}
    for _ in range(rng.randint(2, 40)):
        package = rng.choice(("", "internal/", "cmd/", "pkg/"))
        files[f"{package}{identifier(rng).lower()}.go"] = go_source(
            rng, "main" if package == "cmd/" else "x", int(rng.lognormvariate(8.8, 1.0))).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, content in files.items():
            archive.writestr(zipfile.ZipInfo(prefix + path, date_time=(1980, 1, 1, 0, 0, 0)), content,
                             compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


@frozen
class Kind:
    """
    A kind of document in the corpus: how many, and how to make one.
    """

    name: str
    count: int
    quick_count: int
    make: Callable[[random.Random], bytes]


KINDS = (
    Kind("packument, 10 versions", 40, 10, lambda rng: packument(rng, 10)),
    Kind("packument, 100 versions", 10, 3, lambda rng: packument(rng, 100)),
    Kind("packument, 1000 versions", 3, 1, lambda rng: packument(rng, 1000)),
    # About as big as the biggest real ones (10-40 MB).
    Kind("packument, 9000 versions", 1, 0, lambda rng: packument(rng, 9000)),
    Kind("go.mod", 400, 100, go_mod),
    Kind(".info", 400, 100, go_info),
    Kind(".tgz (npm tarball)", 20, 5, npm_tarball),
    Kind(".zip (Go module)", 20, 5, go_zip),
)


def corpus(quick: bool) -> dict[str, list[bytes]]:
    """
    The documents of every kind, the same on every run.
    """
    documents: dict[str, list[bytes]] = {}
    for kind in KINDS:
        count = kind.quick_count if quick else kind.count
        if count:
            rng = random.Random(f"{SEED}-{kind.name}")
            documents[kind.name] = [kind.make(rng) for _ in range(count)]
    return documents


# The compression table.


@frozen
class CodecResult:
    """
    One kind's documents through L{Compression.encode} at one level, and
    the stored ones read back through L{decoder}.
    """

    kind: str
    level: int
    original: int
    stored: int
    encodings: dict[str, int]
    #: Median seconds per pass over all the documents.
    encode_seconds: float
    #: Bytes decoded per pass (those stored compressed), and the median
    #: seconds it took.
    decoded: int
    decode_seconds: float
    runs: int

    @property
    def ratio(self) -> float:
        return self.original / self.stored

    @property
    def decision(self) -> str:
        if len(self.encodings) == 1:
            return next(iter(self.encodings))
        return ", ".join(f"{count} {encoding}" for encoding, count in sorted(self.encodings.items(), reverse=True))


def passes(run: Callable[[], object], repeat: int | None, target: float) -> tuple[float, int]:
    """
    The median seconds C{run} takes: C{repeat} runs, or as many as fit in
    C{target} seconds (at least one).
    """
    times: list[float] = []
    started = time.perf_counter()
    while True:
        before = time.perf_counter()
        run()
        times.append(time.perf_counter() - before)
        if len(times) >= (repeat or 1) and (repeat is not None or time.perf_counter() - started >= target):
            return statistics.median(times), len(times)


def encode_all(compression: Compression, documents: Sequence[bytes]) -> list[tuple[str, bytes]]:
    """
    Each document as the store would keep it: its encoding, and the
    compressed bytes (empty when stored as it came). In memory: the codec
    is measured, not the disk.
    """
    encoded = []
    for content in documents:
        target = io.BytesIO()
        encoding = compression.encode(io.BytesIO(content), len(content), target)
        encoded.append((encoding, target.getvalue()))
    return encoded


def decode_all(documents: Sequence[bytes], encoded: Sequence[tuple[str, bytes]]) -> None:
    """
    Read every compressed document back as L{send_blob} has the store read
    it: one up to L{CHUNK_SIZE} whole with L{decode} (L{Store.read}), a
    bigger one in L{CHUNK_SIZE} reads from L{decoder} (L{Store.get}).
    """
    for content, (encoding, data) in zip(documents, encoded):
        if encoding == IDENTITY:
            continue
        if len(content) <= CHUNK_SIZE:
            decode(data, encoding)
            continue
        reader = decoder(io.BytesIO(data), encoding)
        try:
            while reader.read(CHUNK_SIZE):
                pass
        finally:
            reader.close()


def measure_codec(
    kind: str, documents: Sequence[bytes], level: int, repeat: int | None, target: float
) -> CodecResult:
    """
    Blocking: time L{encode_all} and L{decode_all} over C{documents}, and
    check that every document decodes to what it was.
    """
    compression = Compression(level)
    # Only the last pass's output is kept.
    encoded: list[list[tuple[str, bytes]]] = [[]]

    def encode_pass() -> None:
        encoded[0] = encode_all(compression, documents)

    encode_seconds, runs = passes(encode_pass, repeat, target)
    stored = encoded[0]
    for content, (encoding, data) in zip(documents, stored):
        if encoding != IDENTITY and decode(data, encoding) != content:
            raise RuntimeError(f"a {kind} document did not decode to what it was at level {level}")
    decode_seconds, _ = passes(lambda: decode_all(documents, stored), repeat, target)
    return CodecResult(
        kind,
        level,
        original=sum(map(len, documents)),
        stored=sum(len(data) if encoding != IDENTITY else len(content)
                   for content, (encoding, data) in zip(documents, stored)),
        encodings=dict(Counter(encoding for encoding, _ in stored)),
        encode_seconds=encode_seconds,
        decoded=sum(len(content) for content, (encoding, _) in zip(documents, stored) if encoding != IDENTITY),
        decode_seconds=decode_seconds,
        runs=runs,
    )


def print_corpus(documents: dict[str, list[bytes]], seconds: float) -> None:
    total = sum(len(d) for kind in documents.values() for d in kind)
    count = sum(map(len, documents.values()))
    print(f"  corpus: {count} documents, {human(total)} ({total:,} bytes), generated in {seconds:.1f} s")
    print(f"  {'kind':<26} {'files':>5} {'total':>10} {'smallest':>10} {'median':>10} {'largest':>10}")
    for kind, contents in documents.items():
        sizes = sorted(map(len, contents))
        print(f"  {kind:<26} {len(sizes):>5} {human(sum(sizes)):>10} {human(sizes[0]):>10} "
              f"{human(statistics.median_low(sizes)):>10} {human(sizes[-1]):>10}")


async def compression_table(
    disk: DiskPool, documents: dict[str, list[bytes]], repeat: int | None, target: float
) -> None:
    print()
    print(f"  {'kind':<26} {'level':>5}  {'stored as':<22} {'ratio':>6} {'encode MB/s':>11} "
          f"{'decode MB/s':>11} {'runs':>5}")
    for kind, contents in documents.items():
        for level in LEVELS:
            # One call on the pool per line: the codec's speed, not the
            # pool's round trips.
            result = await disk.run(measure_codec, kind, contents, level, repeat, target)
            decode_rate = (f"{result.decoded / result.decode_seconds / MB:11.1f}" if result.decoded
                           else f"{'-':>11}")
            print(f"  {kind:<26} {level:>5}  {result.decision:<22} {result.ratio:6.2f} "
                  f"{result.original / result.encode_seconds / MB:11.1f} {decode_rate} {result.runs:>5}",
                  flush=True)


# The corpus through a store.


def pieces(content: bytes) -> Iterator[bytes]:
    """
    C{content} in L{PUT_CHUNK} pieces, as an upstream body arrives.
    """
    view = memoryview(content)
    for offset in range(0, len(content), PUT_CHUNK):
        yield bytes(view[offset : offset + PUT_CHUNK])


async def read_content(store: Store, blob: Blob) -> bytes:
    """
    A blob's content read as L{send_blob} reads it: a small one in one
    trip, a bigger one streamed in L{CHUNK_SIZE} reads.
    """
    if blob.size <= CHUNK_SIZE:
        return await store.read(blob, 0, blob.size)
    reader = await store.get(blob)
    parts = []
    try:
        while chunk := await reader.read(CHUNK_SIZE):
            parts.append(chunk)
    finally:
        await reader.close()
    return b"".join(parts)


def disk_usage(directory: str) -> tuple[int, int, int]:
    """
    The files under C{directory}: how many, their bytes, and the bytes of
    the blocks they take.
    """
    files = size = blocks = 0
    for root, _, names in os.walk(directory):
        for name in names:
            st = os.stat(os.path.join(root, name))
            files, size, blocks = files + 1, size + st.st_size, blocks + st.st_blocks * 512
    return files, size, blocks


@frozen
class Through:
    """
    The corpus put through a store and read back.
    """

    name: str
    logical: int
    stored: int
    #: Per kind: (logical, stored, encodings).
    kinds: dict[str, tuple[int, int, Counter[str]]]
    put_seconds: float
    get_seconds: float
    blobs: int
    on_disk: tuple[int, int, int] | None


async def through_store(
    name: str, disk: DiskPool, store: Store, documents: dict[str, list[bytes]], blobs: str | None
) -> Through:
    """
    Put every document into C{store} one after the other, as misses come
    in, then read each back as L{send_blob} would and check it. C{blobs}
    is the directory of a filesystem store's blobs.
    """
    await store.start()
    kinds: dict[str, tuple[int, int, Counter[str]]] = {}
    put: list[tuple[bytes, Blob]] = []
    started = time.perf_counter()
    for kind, contents in documents.items():
        logical = stored = 0
        encodings: Counter[str] = Counter()
        for content in contents:
            result = await store.put(pieces(content))
            if not result.created:
                raise RuntimeError(f"a {kind} document was in the store already")
            logical += result.size
            stored += result.blob.stored if result.blob.stored is not None else result.size
            encodings[result.blob.encoding] += 1
            put.append((content, result.blob))
        kinds[kind] = (logical, stored, encodings)
    put_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for content, blob in put:
        if await read_content(store, blob) != content:
            raise RuntimeError(f"blob {blob.hash.hex} ({blob.encoding}) read back other bytes")
    get_seconds = time.perf_counter() - started
    on_disk = None if blobs is None else await disk.run(disk_usage, blobs)
    return Through(
        name,
        logical=sum(logical for logical, _, _ in kinds.values()),
        stored=sum(stored for _, stored, _ in kinds.values()),
        kinds=kinds,
        put_seconds=put_seconds,
        get_seconds=get_seconds,
        blobs=len(put),
        on_disk=on_disk,
    )


async def end_to_end(
    disk: DiskPool, workdir: str, documents: dict[str, list[bytes]], s3: S3Server | None
) -> None:
    level = Compression(DEFAULT_LEVEL)
    results = []
    for name, compression in (("filesystem, no compression", Compression(0)),
                              (f"filesystem, zstd {DEFAULT_LEVEL}", level)):
        directory = os.path.join(workdir, f"corpus-{compression.level}")
        store = make_store(disk, directory, compression=compression)
        results.append(await through_store(name, disk, store, documents, os.path.join(directory, BLOB_PREFIX)))
    if s3 is not None:
        store = make_store(disk, os.path.join(workdir, "corpus-s3"), s3, S3_PREFIX + "corpus/",
                           compression=level)
        results.append(await through_store(f"S3, zstd {DEFAULT_LEVEL}", disk, store, documents, None))

    print()
    print(f"  {'store':<28} {'blobs':>5} {'logical':>10} {'stored':>10} {'ratio':>6} {'put s':>6} "
          f"{'put MB/s':>8} {'get s':>6} {'get MB/s':>8}  on disk (files, blocks)")
    for r in results:
        disk_note = "" if r.on_disk is None else f"  {r.on_disk[0]}, {human(r.on_disk[2])}"
        print(f"  {r.name:<28} {r.blobs:>5} {human(r.logical):>10} {human(r.stored):>10} "
              f"{r.logical / r.stored:6.2f} {r.put_seconds:6.2f} {r.logical / r.put_seconds / MB:8.1f} "
              f"{r.get_seconds:6.2f} {r.logical / r.get_seconds / MB:8.1f}{disk_note}")
    compressed = results[1]
    print()
    print(f"  per kind, {compressed.name}:")
    print(f"  {'kind':<26} {'logical':>10} {'stored':>10} {'ratio':>6}  stored as")
    for kind, (logical, stored, encodings) in compressed.kinds.items():
        decision = ", ".join(f"{count} {encoding}" for encoding, count in sorted(encodings.items(), reverse=True))
        print(f"  {kind:<26} {human(logical):>10} {human(stored):>10} {logical / stored:6.2f}  {decision}")


# The run.


async def benchmark(reactor: Reactor, workdir: str, args: argparse.Namespace, s3: S3Server | None) -> None:
    codec_target = QUICK_CODEC_TARGET_SECONDS if args.quick else CODEC_TARGET_SECONDS
    print_setup("compression benchmark", workdir, args.quick, reactor, s3)
    disk = start_disk_pool(reactor)
    print()
    print("Compression of each kind")
    generating = time.perf_counter()
    documents = corpus(args.quick)
    print_corpus(documents, time.perf_counter() - generating)
    print("  Compression(level).encode per document, as the store decides at commit (a trial on")
    print("  the first 64 KiB, kept if it saves 10%; gzip and zip kept as they come), in memory,")
    print("  one thread; decode: the zstd ones read back as send_blob has the store read them:")
    print("  up to 256 KiB whole with decode() (Store.read), bigger through decoder() in 256 KiB")
    print("  reads (Store.get).")
    print("  ratio = original / stored bytes; MB/s of original bytes at the median pass over the")
    print(f"  kind; runs: passes timed (at least one, {args.repeat or f'for {codec_target:g} s'})")
    await compression_table(disk, documents, args.repeat, codec_target)

    print()
    print("The corpus through a store: each document put (1 MiB chunks, fsync) one after the")
    print("other, then read back as send_blob reads it and compared; blobs are sized in bytes")
    print("stored (one object each), and on disk in filesystem blocks")
    await end_to_end(disk, workdir, documents, s3)


def main(argv: Sequence[str] | None = None) -> None:
    parser = store_parser(__doc__, "a smaller corpus and shorter timings, for a smoke run",
                          "time every pass of a codec over a kind N times"
                          " (default: for about 0.5 s each)")
    react_on_storage(benchmark, check_dir(parser, parser.parse_args(argv)))


if __name__ == "__main__":
    main()
