"""
The configuration file: options by their long names, [npm] and [go]
tables, flags and the environment winning over it, and mistakes named by
file, line and key.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest
from twisted.python.usage import UsageError

from .daemon import TWISTD, Daemon
from .gomodules import GREET, build_tree, modules
from .test_goproxy import request
from .test_tap import parse
from .upstream import UpstreamFixture

FILE = """\
# What the build server's cache needs.
storage = "{storage}"
max-size = "20GiB"
disk_threads = 4
no-metrics = true

[npm]
upstream = "http://127.0.0.1:9/npm-upstream/"
tarball-host = ["cdn.registry.example", "cdn2.registry.example:8443"]
metadata-ttl = "10m"

[go]
upstream = "http://127.0.0.1:9/goproxy-upstream"
sumdb = "off"
"""


def write(tmp_path: Any, text: str, name: str = "contentcache.toml") -> str:
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_the_file_sets_options_by_their_long_names(tmp_path: Any) -> None:
    storage = os.path.join(str(tmp_path), "cache")
    options = parse(["--config", write(tmp_path, FILE.format(storage=storage))])
    assert options["storage"].blobs == storage
    assert options["max-size"] == 20 * 1024**3
    assert options["disk-threads"] == 4
    assert options["no-metrics"]
    assert options["npm-upstream"] == "http://127.0.0.1:9/npm-upstream/"
    assert options["npm-metadata-ttl"] == 600
    assert options["go-upstream"] == "http://127.0.0.1:9/goproxy-upstream"


def test_a_flag_or_the_environment_wins_over_the_file(tmp_path: Any) -> None:
    path = write(tmp_path, FILE.format(storage=os.path.join(str(tmp_path), "cache")))
    options = parse(["--config", path, "--disk-threads", "16"], {"CONTENTCACHE_MAX_SIZE": "1GiB"})
    assert options["disk-threads"] == 16
    assert options["max-size"] == 1024**3
    assert options["go-upstream"] == "http://127.0.0.1:9/goproxy-upstream"  # the rest from the file
    # The file named in the environment.
    assert parse([], {"CONTENTCACHE_CONFIG": path})["disk-threads"] == 4


@pytest.mark.parametrize(
    "text, message",
    [
        ('storage = "./c"\nstroage = "./d"\n',
         r"^{path}, line 2: key 'stroage' is not a setting of contentcache \(twistd contentcache --help lists them\)\.$"),
        ('[npm]\nupstream = "http://127.0.0.1:9/"\nregistry = "http://127.0.0.1:9/"\n',
         r"^{path}, line 3: key 'registry' is not a setting of contentcache"),
        ('disk-threads = "many"\n',
         r"^{path}, line 1: key 'disk-threads': --disk-threads must be a whole number from 1 to \d+, not 'many'\.$"),
        ('workers = 2\nmax-size = ["1GiB", "2GiB"]\n',
         r"^{path}, line 2: key 'max-size' takes one value, not list \['1GiB', '2GiB'\]\.$"),
        ('no-metrics = "yes"\n', r"^{path}, line 1: key 'no-metrics' is true or false, not 'yes'\.$"),
        ('storage = "./c\n', r"^{path}, line 1: this is not TOML \(.+\)\.$"),
        ('[go]\nupstream = "http://127.0.0.1:9/"\n[go]\nsumdb = "off"\n', r"^{path}, line 3: this is not TOML \(.+\)\.$"),
    ],
)
def test_a_mistake_names_the_file_the_line_and_the_key(tmp_path: Any, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UsageError, match=message.format(path=path.replace(".", r"\."))):
        parse(["--config", path])


def test_stale_while_revalidate_in_the_file(tmp_path: Any) -> None:
    assert parse(["--config", write(tmp_path, 'stale-while-revalidate = "12h"\n')])["stale-while-revalidate"] == 43200
    assert parse(["--config", write(tmp_path, "stale_while_revalidate = 0\n")])["stale-while-revalidate"] == 0
    with pytest.raises(UsageError, match=r"line 1: key 'stale-while-revalidate': --stale-while-revalidate: "
                                         r"'often' is not a duration"):
        parse(["--config", write(tmp_path, 'stale-while-revalidate = "often"\n')])


def test_access_has_a_table_of_its_own(tmp_path: Any) -> None:
    options = parse(["--config", write(tmp_path, '[access]\ndefault = "token"\nmetrics = "token"\n')])
    assert (options["access"], options["metrics-access"], options["ui-access"]) == ("token", "token", "token")
    options = parse(["--config", write(tmp_path, '[access]\nmetrics = "token"\nui = "public"\n')])
    assert (options["metrics-access"], options["ui-access"]) == ("token", "public")
    with pytest.raises(UsageError, match=r"line 2: key 'everyone' in \[access\] is default, metrics or ui"):
        parse(["--config", write(tmp_path, '[access]\neveryone = "token"\n')])


def test_a_missing_file_is_one_sentence(tmp_path: Any) -> None:
    path = os.path.join(str(tmp_path), "nowhere.toml")
    with pytest.raises(UsageError, match=rf"^Cannot read the configuration file {path}: No such file or directory\.$"):
        parse(["--config", path])


def test_the_daemon_runs_from_its_file(tmp_path: Any) -> None:
    upstream = UpstreamFixture(build_tree(str(tmp_path / "proxy"), modules()))
    path = write(tmp_path, f'[go]\nupstream = "{upstream.url}"\nsumdb = "off"\n')
    daemon = Daemon(str(tmp_path / "storage"), ["--config", path])
    try:
        status, headers, _ = request(daemon.url, f"/goproxy/{GREET}/@v/v1.2.0.info")
        assert (status, headers["x-cache"]) == (200, "MISS")
        assert upstream.count(f"/{GREET}/@v/v1.2.0.info") == 1
    finally:
        daemon.stop()
        upstream.stop()

    # A mistake stops it before it listens, in one sentence.
    bad = write(tmp_path, 'max-size = "lots"\n', "bad.toml")
    process = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "contentcache", "--config", bad, "--storage", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
    )
    assert process.returncode != 0
    last = (process.stdout + process.stderr).strip().splitlines()[-1]
    # (twistd puts its own name first.)
    assert last.endswith(f": {bad}, line 1: key 'max-size': --max-size: 'lots' is not a size like 512MiB, "
                         "20GiB or 1.5TB."), last
