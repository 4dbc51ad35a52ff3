from __future__ import annotations

import os

import pytest
from twisted.application.service import IServiceCollection
from twisted.python.usage import UsageError

from contentcache.compress import Compression
from contentcache.tap import Options, makeService


def parse(argv: list[str], environ: dict[str, str] | None = None) -> Options:
    options = Options(environ=environ or {})
    options.parseOptions(argv)
    return options


def test_defaults(tmp_path: object) -> None:
    options = parse([])
    assert options["port"] == "tcp:8080"
    assert options["storage"].blobs == os.path.abspath("./cache")
    assert options["storage"].state_dir == os.path.abspath("./cache")
    assert options["storage"].compression == Compression(3)
    assert options["disk-threads"] == 8


@pytest.mark.parametrize(
    "given, expected",
    [
        ("8080", "tcp:8080"),
        ("0", "tcp:0"),
        ("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"),
        ("unix:/tmp/cc.sock", "unix:/tmp/cc.sock"),
    ],
)
def test_port(given: str, expected: str) -> None:
    assert parse(["--port", given])["port"] == expected


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "99999"], "not a port number"),
        (["--port", "carrier-pigeon:1"], "not an endpoint"),
        (["--port", "tcp:notanumber"], "not an endpoint"),
        (["--disk-threads", "0"], "--disk-threads must be a whole number"),
        (["--disk-threads", "many"], "--disk-threads must be a whole number"),
        (["--storage", ""], "--storage needs a directory"),
        (["--no-such-option"], "no-such-option"),
    ],
)
def test_bad_values_are_one_sentence(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as e:
        parse(argv)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_storage_that_is_a_file(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "file")
    open(path, "w").close()
    with pytest.raises(UsageError, match="is not a directory"):
        parse(["--storage", path])


def test_environment_sets_options(tmp_path: object) -> None:
    options = parse(
        [],
        {
            "CONTENTCACHE_PORT": "9090",
            "CONTENTCACHE_STORAGE": str(tmp_path),
            "CONTENTCACHE_DISK_THREADS": "3",
        },
    )
    assert options["port"] == "tcp:9090"
    assert options["storage"].blobs == str(tmp_path)
    assert options["disk-threads"] == 3


@pytest.mark.parametrize(
    "argv", [["--port", "7070"], ["--port=7070"], ["-p", "7070"], ["-p7070"]]
)
def test_flag_wins_over_environment(argv: list[str]) -> None:
    assert parse(argv, {"CONTENTCACHE_PORT": "9090"})["port"] == "tcp:7070"


def test_bad_environment_value_names_the_option() -> None:
    with pytest.raises(UsageError, match="--disk-threads"):
        parse([], {"CONTENTCACHE_DISK_THREADS": "lots"})


def test_make_service_wires_without_io(tmp_path: object) -> None:
    storage = os.path.join(str(tmp_path), "not-yet")
    service = makeService(parse(["--storage", storage, "--port", "tcp:0", "--workers", "1"]))
    assert IServiceCollection.providedBy(service)
    names = [type(s).__name__ for s in service]
    # Tracing flushes last, after the disk pool, which stops after all
    # that uses it; the port listens after everything it serves has started,
    # and only then is systemd told the daemon is ready.
    assert names[:2] == ["TracingService", "DiskPool"]
    assert names[-2:] == ["StreamServerEndpointService", "NotifyReady"]
    assert not os.path.exists(storage)  # nothing touched before start


def test_workers_are_started_by_a_supervisor(tmp_path: object) -> None:
    storage = os.path.join(str(tmp_path), "not-yet")
    options = parse(["--storage", storage, "--port", "tcp:0", "--workers", "3"])
    service = makeService(options)
    # What the workers would fail on is checked before the port is bound;
    # the port is bound once; systemd hears of it once they all listen.
    assert [type(s).__name__ for s in service] == ["Preflight", "Supervisor", "ExitCleanlyOnSIGTERM", "NotifyReady"]
    assert [s for s in service if type(s).__name__ == "Supervisor"][0].count == 3  # type: ignore[attr-defined]
    assert not os.path.exists(storage)  # nothing touched before start


@pytest.mark.parametrize("given, expected", [([], min(len(os.sched_getaffinity(0)), 8)), (["--workers", "1"], 1)])
def test_workers_default_to_the_cpus(given: list[str], expected: int) -> None:
    assert parse(given)["workers"] == expected
    for bad in ("0", "-1", "many", "65"):
        with pytest.raises(UsageError, match="--workers must be a whole number"):
            parse(["--workers", bad])


def test_flags_from_environment() -> None:
    assert parse([], {"CONTENTCACHE_NO_METRICS": "1"})["no-metrics"]
    assert not parse([], {"CONTENTCACHE_NO_METRICS": "0"})["no-metrics"]
    assert not parse([])["no-metrics"]


@pytest.mark.parametrize(
    "storage, evicts",
    [("{tmp}/fs", True), ("s3://bucket/prefix", False)],
    ids=["filesystem", "s3"],
)
def test_min_free_evicts_only_where_evicting_frees_room(tmp_path: object, storage: str, evicts: bool) -> None:
    # With S3 the spool directory's room is watched (507 when it is full),
    # but evicting S3 objects would free none of it: the default is off.
    argv = ["--storage", storage.format(tmp=tmp_path), "--port", "tcp:0", "--workers", "1"]
    if storage.startswith("s3://"):
        argv += ["--state-dir", str(tmp_path), "--s3-endpoint", "http://127.0.0.1:9"]
        for explicit in (["--min-free", "10%"], ["--min-free", "5%"]):
            with pytest.raises(UsageError, match="--min-free applies to a storage directory"):
                parse([*argv, *explicit])
        with pytest.raises(UsageError, match="--min-free applies to a storage directory"):
            parse(argv, {"CONTENTCACHE_MIN_FREE": "5%"})
        parse([*argv, "--min-free", "0"])
    service = makeService(parse(argv))
    [leadership] = [s for s in service if type(s).__name__ == "Leadership"]
    [expiry] = [s for s in leadership if type(s).__name__ == "ExpiryService"]  # type: ignore[attr-defined]
    assert expiry.expiry.policy.min_free.enabled is evicts  # type: ignore[attr-defined]
    assert expiry.expiry.store.space.min_free.enabled is evicts  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--min-free", "lots"], "--min-free: 'lots' is neither a size"),
        (["--header-timeout", "0"], "--header-timeout must be more than 0."),
        (["--scrub-interval", "weekly"], "--scrub-interval: 'weekly' is not a duration"),
    ],
)
def test_the_new_options_are_checked(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(argv)


def test_stale_while_revalidate_is_a_duration() -> None:
    assert parse([])["stale-while-revalidate"] == 86400
    assert parse(["--stale-while-revalidate", "0"])["stale-while-revalidate"] == 0
    assert parse([], {"CONTENTCACHE_STALE_WHILE_REVALIDATE": "2h"})["stale-while-revalidate"] == 7200
    with pytest.raises(UsageError, match="--stale-while-revalidate: 'sometimes' is not a duration"):
        parse(["--stale-while-revalidate", "sometimes"])
