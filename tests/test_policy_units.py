"""
The policy's decisions, without a daemon: semver precedence, deny ranges,
the minimum release age with its exemptions, dist-tags, and the
configuration file's [policy] tables.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from contentcache.config import ConfigError, load
from contentcache.policy import (
    DenyRule,
    Policy,
    VersionRange,
    filter_packument,
    parse_time,
    publish_times,
    retarget_tags,
    version_key,
)

DAY = 86400.0
NOW = parse_time("2026-12-01T12:00:00Z")
assert NOW is not None


def ago(days: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(NOW - days * DAY, datetime.timezone.utc).isoformat()


def test_semver_precedence() -> None:
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
               "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.10.0", "2.0.0"]
    assert sorted(ordered, key=version_key) == ordered  # type: ignore[arg-type]
    assert version_key("v1.2.3") == version_key("1.2.3")
    assert version_key("v2.0.0+incompatible") == version_key("2.0.0")
    assert version_key("latest") is None
    assert version_key("01.2.3") is None


@pytest.mark.parametrize("text, inside, outside", [
    ("3.3.6", ["3.3.6"], ["3.3.5", "3.3.7", "3.3.6-beta"]),
    ("<2.0.0", ["1.9.9", "0.1.0", "2.0.0-rc.1"], ["2.0.0", "2.0.1"]),
    (">=1.2.0 <1.3.0", ["1.2.0", "1.2.9"], ["1.1.9", "1.3.0"]),
    ("*", ["0.0.1", "9.9.9-x", "not-semver"], []),
    ("^1.2.0", ["1.2.0", "1.9.0"], ["2.0.0", "1.1.0"]),
    ("^0.2.3", ["0.2.3", "0.2.9"], ["0.3.0"]),
    ("~1.2.0", ["1.2.5"], ["1.3.0"]),
    ("<1.0.0 || >=3.0.0", ["0.9.0", "3.1.0"], ["1.0.0", "2.9.9"]),
    ("v1.2.3", ["v1.2.3", "1.2.3"], ["v1.2.4"]),
])
def test_version_ranges(text: str, inside: list[str], outside: list[str]) -> None:
    versions = VersionRange.parse(text)
    for version in inside:
        assert version in versions, (text, version)
    for version in outside:
        assert version not in versions, (text, version)


@pytest.mark.parametrize("text", ["1.x", ">= ", "1.2", "latest", "<<1.0.0", ""])
def test_invalid_ranges(text: str) -> None:
    with pytest.raises(ValueError):
        VersionRange.parse(text)


def test_minimum_release_age_with_exemptions() -> None:
    policy = Policy("npm", 7 * DAY, ("@corp/*", "lodash@4.17.22"))
    old, young = NOW - 8 * DAY, NOW - 1 * DAY
    assert policy.verdict("left-pad", "1.0.0", old, NOW) is None
    hidden = policy.verdict("left-pad", "1.1.0", young, NOW)
    assert hidden is not None and hidden.until == young + 7 * DAY
    assert "left-pad@1.1.0 was published 2026-11-30 12:00 UTC, less than 7d ago" in hidden.reason
    assert "available from 2026-12-07 12:00 UTC" in hidden.reason
    # Never earlier than it is: the minute after.
    later = policy.verdict("left-pad", "1.1.1", young + 1, NOW)
    assert later is not None and "available from 2026-12-07 12:01 UTC" in later.reason
    # Fail closed: no time, hidden, and not by the passing of time.
    missing = policy.verdict("left-pad", "1.2.0", None, NOW)
    assert missing is not None and missing.until is None and "no publish time" in missing.reason
    assert policy.verdict("@corp/tool", "1.0.0", young, NOW) is None
    assert policy.verdict("@corp/tool", "1.0.0", None, NOW) is None
    assert policy.verdict("lodash", "4.17.22", young, NOW) is None
    assert policy.verdict("lodash", "4.17.23", young, NOW) is not None
    assert policy.applies("left-pad") and not policy.applies("@corp/tool")
    assert not policy.needs_times("lodash", "4.17.22") and policy.needs_times("lodash", "4.17.23")
    assert not Policy("npm").active and not Policy("npm").applies("x")
    # A Go pin with or without the v.
    go = Policy("go", 7 * DAY, ("example.com/m@1.2.0", "example.com/n@v2.0.0"))
    assert go.verdict("example.com/m", "v1.2.0", young, NOW) is None
    assert go.verdict("example.com/n", "v2.0.0", young, NOW) is None
    assert go.verdict("example.com/m", "v1.2.1", young, NOW) is not None
    assert Policy("npm", 7 * DAY).digest != policy.digest


def test_deny_rules_name_exactly_their_versions() -> None:
    rule = DenyRule("npm", "event-*", VersionRange.parse("3.3.6"), "malicious release")
    policy = Policy("npm", deny=(rule,))
    hidden = policy.verdict("event-stream", "3.3.6", NOW - 400 * DAY, NOW)
    assert hidden is not None and hidden.rule == "deny" and hidden.until is None
    assert hidden.reason == "event-stream@3.3.6 is denied by this cache's policy: malicious release"
    assert policy.verdict("event-stream", "3.3.5", None, NOW) is None
    assert policy.verdict("other", "3.3.6", None, NOW) is None
    assert policy.applies("event-stream") and not policy.applies("other")
    # An exemption from the age is none from a deny rule.
    both = Policy("npm", 7 * DAY, ("event-stream@3.3.6",), (rule,))
    assert both.verdict("event-stream", "3.3.6", NOW, NOW) is not None


def test_tags_move_to_the_highest_remaining_version() -> None:
    # The example: latest 1.2.0 and next 1.3.0-beta.1 both too new.
    document: dict[str, Any] = {
        "name": "pkg",
        "dist-tags": {"latest": "1.2.0", "next": "1.3.0-beta.1", "old": "1.0.0"},
        "versions": {v: {"version": v} for v in ("1.0.0", "1.1.0", "1.2.0", "1.3.0-beta.1", "1.4.0")},
        "time": {"created": ago(30), "modified": ago(1), "1.0.0": ago(30), "1.1.0": ago(20),
                 "1.2.0": ago(2), "1.3.0-beta.1": ago(1)},
    }
    policy = Policy("npm", 7 * DAY)
    until = filter_packument(document, policy, "pkg", publish_times(document), NOW)
    assert sorted(document["versions"]) == ["1.0.0", "1.1.0"]  # 1.4.0 has no time: hidden
    assert set(document["time"]) == {"created", "modified", "1.0.0", "1.1.0"}
    assert document["dist-tags"] == {"latest": "1.1.0", "next": "1.1.0", "old": "1.0.0"}
    assert until == pytest.approx(NOW - 2 * DAY + 7 * DAY)


def test_a_prerelease_tag_keeps_a_prerelease_and_a_tag_with_nothing_left_goes() -> None:
    hidden_by = Policy("npm", 7 * DAY).verdict("p", "2.0.0-rc.2", None, NOW)
    assert hidden_by is not None
    hidden = {"2.0.0-rc.2": hidden_by, "1.0.0": hidden_by}
    tags = {"next": "2.0.0-rc.2", "latest": "1.0.0"}
    assert retarget_tags(tags, ["2.0.0-rc.1", "0.9.0-beta"], hidden) == {"next": "2.0.0-rc.1"}
    assert retarget_tags(tags, [], hidden) == {}
    # The highest remaining, as the issue has it, even above the tag's own.
    assert retarget_tags({"latest": "1.0.0"}, ["0.9.0", "3.0.0"], hidden) == {"latest": "3.0.0"}


def write(tmp_path: Any, text: str) -> str:
    path = os.path.join(str(tmp_path), "contentcache.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_policy_tables_in_the_config_file(tmp_path: Any) -> None:
    config = load(write(tmp_path, '''
npm-min-age = "7d"

[policy.min_age]
exempt = ["@corp/*", "golang.org/x/*", "lodash@4.17.22"]

[[policy.deny]]
protocol = "npm"
name = "event-stream"
versions = "3.3.6"
reason = "malicious release"

[[policy.deny]]
protocol = "go"
name = "example.com/bad/*"
versions = ">=1.2.0 <1.3.0"
reason = "CVE-2026-0001"
'''), ["npm-min-age"], [], [])
    assert config.exempt == ["@corp/*", "golang.org/x/*", "lodash@4.17.22"]
    assert [(r.protocol, r.name, r.versions.text, r.reason) for r in config.deny] == [
        ("npm", "event-stream", "3.3.6", "malicious release"),
        ("go", "example.com/bad/*", ">=1.2.0 <1.3.0", "CVE-2026-0001"),
    ]
    assert config.settings[0].option == "npm-min-age"


@pytest.mark.parametrize("text, message", [
    ('[[policy.deny]]\nprotocol = "pypi"\nname = "x"\n', "line 2: key 'protocol' is npm or go"),
    ('[[policy.deny]]\nprotocol = "npm"\n', "line 1: a deny rule needs 'name'"),
    ('[[policy.deny]]\nprotocol = "npm"\nname = "x"\nversions = "1.x"\n', "line 4: key 'versions' is \"*\""),
    ('[[policy.deny]]\nprotocol = "npm"\nname = "x"\nwhy = "y"\n', "line 4: key 'why' is not a setting"),
    ('[policy.min_age]\nexempt = [1]\n', "line 2: key 'exempt' is a list of names"),
    ('[policy.min_age]\nnpm = "7d"\n', "line 2: key 'npm' is not a setting of [policy.min_age]"),
    ('[policy]\nage = 3\n', "line 2: key 'age' in [policy]"),
])
def test_policy_mistakes_name_the_line(tmp_path: Any, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text), [], [], [])
    assert message in str(caught.value)
