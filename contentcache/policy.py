"""
Policies over what is served: a minimum release age (a version is hidden
until it has been published for long enough, unless exempt) and deny rules
(versions hidden and refused for a stated reason, cached or not).

Both protocols use the same rules: a version is I{hidden} from the
documents that list versions (npm packuments and their dist-tags, Go
C{@v/list} and C{@latest}) and I{refused} (403, with the reason) where a
client asks for it by name. What is decided here is pure: names,
versions, publish times and the clock go in, a L{Hidden} (or nothing) comes
out.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from attrs import field, frozen
from twisted.logger import Logger

log = Logger()

NPM = "npm"
GO = "go"
PROTOCOLS = (NPM, GO)
#: Changed whenever what filtering makes of a document changes.
FILTER_VERSION = 1

_NUMBER = r"0|[1-9][0-9]*"
_IDENT = r"[0-9A-Za-z-]+"
_SEMVER = re.compile(
    rf"v?({_NUMBER})\.({_NUMBER})\.({_NUMBER})(?:-({_IDENT}(?:\.{_IDENT})*))?(?:\+({_IDENT}(?:\.{_IDENT})*))?"
)

Key = tuple[int, int, int, int, tuple[tuple[int, Any], ...]]


def version_key(version: str) -> Key | None:
    """
    The semver precedence of C{version} as a sortable key (a leading C{v},
    as Go writes versions, is allowed; build metadata is ignored), or
    L{None} for what is not a semantic version.
    """
    m = _SEMVER.fullmatch(version)
    if m is None:
        return None
    pre: tuple[tuple[int, Any], ...] = ()
    if m[4] is not None:
        pre = tuple((0, int(p)) if p.isdigit() else (1, p) for p in m[4].split("."))
    # A release ranks above every prerelease of the same version.
    return int(m[1]), int(m[2]), int(m[3]), 0 if pre else 1, pre


def is_prerelease(version: str) -> bool:
    key = version_key(version)
    return key is not None and key[3] == 0


def parse_time(value: object) -> float | None:
    """
    Seconds since the epoch of an RFC 3339 time (npm's C{time}, Go's
    C{.info} C{Time}), or L{None} if it is not one.
    """
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def format_time(seconds: float, up: bool = False) -> str:
    """
    A time to the minute (C{up}: the minute after, for a time from which
    something is so).
    """
    if up:
        seconds = math.ceil(seconds / 60) * 60
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class InvalidRange(ValueError):
    pass


_COMPARATOR = re.compile(r"(<=|>=|<|>|=|\^|~)?\s*(\S+)")


@frozen
class VersionRange:
    """
    Which versions a deny rule names: C{*}, an exact version, or
    comparators (C{<2.0.0}, C{>=1.2.0 <1.3.0}, C{^1.2.0}, C{~1.2.0}),
    alternatives joined by C{||}. Compared by semver precedence, so a
    prerelease inside a range is in it.
    """

    text: str
    #: Alternatives, each a list of (operator, key) that must all hold.
    alternatives: tuple[tuple[tuple[str, Key], ...], ...]

    @classmethod
    def parse(cls, text: str) -> VersionRange:
        text = text.strip()
        if text == "*":
            return cls("*", ((),))
        alternatives = []
        for part in text.split("||"):
            comparators: list[tuple[str, Key]] = []
            tokens = re.findall(r"(?:<=|>=|<|>|=|\^|~)?\s*[^\s<>=^~|]+", part)
            if not tokens or "".join(tokens).replace(" ", "") != part.replace(" ", ""):
                raise InvalidRange(text)
            for token in tokens:
                m = _COMPARATOR.fullmatch(token.strip())
                key = version_key(m[2]) if m else None
                if m is None or key is None:
                    raise InvalidRange(text)
                comparators.extend(_expand(m[1] or "=", key))
            alternatives.append(tuple(comparators))
        return cls(text, tuple(alternatives))

    def __contains__(self, version: str) -> bool:
        key = version_key(version)
        if key is None:
            # Not a semantic version: named only by "*" or by itself.
            return self.alternatives == ((),) or version.strip() == self.text
        return any(all(_holds(op, key, bound) for op, bound in alternative) for alternative in self.alternatives)


def _release(major: int, minor: int, patch: int) -> Key:
    return major, minor, patch, 1, ()


def _lowest(major: int, minor: int, patch: int) -> Key:
    # Below every prerelease of major.minor.patch.
    return major, minor, patch, 0, ()


def _expand(op: str, key: Key) -> list[tuple[str, Key]]:
    major, minor, patch = key[:3]
    if op == "^":
        if major:
            upper = _lowest(major + 1, 0, 0)
        elif minor:
            upper = _lowest(0, minor + 1, 0)
        else:
            upper = _lowest(0, 0, patch + 1)
        return [(">=", key), ("<", upper)]
    if op == "~":
        return [(">=", key), ("<", _lowest(major, minor + 1, 0))]
    return [(op, key)]


def _holds(op: str, key: Key, bound: Key) -> bool:
    if op == "=":
        return key == bound
    if op == "<":
        return key < bound
    if op == "<=":
        return key <= bound
    if op == ">":
        return key > bound
    return key >= bound


@frozen
class DenyRule:
    """
    One C{[[policy.deny]]}.
    """

    protocol: str
    name: str
    versions: VersionRange
    reason: str
    where: str = ""

    def names(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.name)


@frozen
class Hidden:
    """
    Why a version is hidden, as the one sentence a client is shown, and
    when it will not be any more (L{None}: not by the passing of time).
    """

    reason: str
    until: float | None = None
    #: "min-age" or "deny": which rule hid it.
    rule: str = "min-age"


class Refused(Exception):
    """
    A version a policy hides was asked for by name: 403 with the reason
    (as JSON C{{"error": ...}} for npm, which shows that field).
    """

    def __init__(self, protocol: str, hidden: Hidden) -> None:
        super().__init__(hidden.reason)
        self.protocol = protocol
        self.hidden = hidden


def _split_pin(entry: str) -> tuple[str, str | None]:
    """
    C{name@version} as (name, version); a glob or a bare name as
    (name, None). A scoped npm name starts with "@", which is no pin.
    """
    at = entry.rfind("@")
    if at > 0:
        return entry[:at], entry[at + 1:]
    return entry, None


@frozen
class Policy:
    """
    One protocol's policy: its minimum release age (0: none), the
    exemptions from it (name or module globs, C{name@version} pins) and
    the deny rules that name its packages or modules.
    """

    protocol: str
    min_age: float = 0.0
    exempt: tuple[str, ...] = ()
    deny: tuple[DenyRule, ...] = ()
    _globs: tuple[str, ...] = field(init=False)
    _pins: frozenset[tuple[str, str]] = field(init=False)
    #: What the policy is, in a few characters: a document filtered under
    #: another policy (or another version of this code) is filtered again.
    digest: str = field(init=False)

    def __attrs_post_init__(self) -> None:
        globs, pins = [], set()
        for entry in self.exempt:
            name, version = _split_pin(entry)
            if version is None:
                globs.append(name)
            else:
                pins.add((name, version.removeprefix("v")))
        object.__setattr__(self, "_globs", tuple(globs))
        object.__setattr__(self, "_pins", frozenset(pins))
        text = json.dumps([FILTER_VERSION, self.min_age, sorted(self.exempt),
                           [[r.name, r.versions.text, r.reason] for r in self.deny]])
        object.__setattr__(self, "digest", hashlib.sha256(text.encode()).hexdigest()[:16])

    def announce(self) -> None:
        """
        Say in the log what the policy is, when there is one.
        """
        if not self.active:
            return
        age = format_duration(self.min_age) if self.min_age > 0 else "none"
        log.info("{protocol} policy: minimum release age {age}, {exempt} exemptions, {deny} deny rules",
                 protocol=self.protocol, age=age, exempt=len(self.exempt), deny=len(self.deny))

    @property
    def active(self) -> bool:
        return self.min_age > 0 or bool(self.deny)

    def _name_exempt(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in self._globs)

    def applies(self, name: str) -> bool:
        """
        Whether any version of C{name} could be hidden: if not, its
        documents are served as upstream wrote them.
        """
        if self.min_age > 0 and not self._name_exempt(name):
            return True
        return any(rule.names(name) for rule in self.deny)

    def needs_times(self, name: str, version: str | None = None) -> bool:
        """
        Whether deciding about C{name}'s versions (or this one) takes their
        publish times.
        """
        if self.min_age <= 0 or self._name_exempt(name):
            return False
        return version is None or (name, version.removeprefix("v")) not in self._pins

    def denied(self, name: str, version: str) -> Hidden | None:
        """
        The deny rule's verdict on C{name@version}, needing no time.
        """
        for rule in self.deny:
            if rule.names(name) and version in rule.versions:
                return Hidden(f"{name}@{version} is denied by this cache's policy: {rule.reason}", None, "deny")
        return None

    def verdict(self, name: str, version: str, published: float | None, now: float) -> Hidden | None:
        """
        Whether C{name@version}, published at C{published} (L{None}: not
        known), is hidden at C{now}, and why.
        """
        denied = self.denied(name, version)
        if denied is not None:
            return denied
        if not self.needs_times(name, version):
            return None
        age = format_duration(self.min_age)
        if published is None:
            return Hidden(
                f"{name}@{version} has no publish time, and this cache serves only versions published at least "
                f"{age} ago (a pin in [policy.min_age] exempt makes it available)"
            )
        available = published + self.min_age
        if now < available:
            return Hidden(
                f"{name}@{version} was published {format_time(published)}, less than {age} ago; "
                f"this cache makes it available from {format_time(available, up=True)}",
                available,
            )
        return None

    def hidden_versions(
        self, name: str, versions: Iterable[str], times: Mapping[str, float | None], now: float
    ) -> tuple[dict[str, Hidden], float]:
        """
        The hidden ones among C{versions} and why, and when that changes
        next (infinity: not by the passing of time).
        """
        hidden: dict[str, Hidden] = {}
        until = math.inf
        for version in versions:
            verdict = self.verdict(name, version, times.get(version), now)
            if verdict is not None:
                hidden[version] = verdict
                if verdict.until is not None:
                    until = min(until, verdict.until)
        return hidden, until


def retarget_tags(tags: Mapping[str, Any], remaining: Sequence[str], hidden: Mapping[str, Hidden]) -> dict[str, Any]:
    """
    dist-tags with none naming a hidden version: a tag whose version went
    names the highest remaining version by semver precedence (a
    prerelease only if the tag named one); a tag with no such version goes.
    """
    keyed = sorted((key, v) for v in remaining if (key := version_key(v)) is not None)
    highest = keyed[-1][1] if keyed else None
    releases = [v for key, v in keyed if key[3] == 1]
    highest_release = releases[-1] if releases else None
    out: dict[str, Any] = {}
    for tag, version in tags.items():
        if not isinstance(version, str) or version not in hidden:
            out[tag] = version
            continue
        moved = highest if is_prerelease(version) else highest_release
        if moved is not None:
            out[tag] = moved
    return out


def publish_times(document: Mapping[str, Any]) -> dict[str, float | None]:
    """
    An npm packument's publish time of each version, from its C{time}.
    """
    times = document.get("time")
    versions = document.get("versions")
    if not isinstance(versions, dict):
        return {}
    if not isinstance(times, dict):
        times = {}
    return {version: parse_time(times.get(version)) for version in versions}


def filter_packument(
    document: dict[str, Any], policy: Policy, name: str, times: Mapping[str, float | None], now: float
) -> float:
    """
    Remove what C{policy} hides from an npm packument (either variant),
    in place: the versions, their C{time}, and dist-tags naming them.
    Returns when the result changes next as time passes.
    """
    versions = document.get("versions")
    if not isinstance(versions, dict):
        return math.inf
    hidden, until = policy.hidden_versions(name, list(versions), times, now)
    if not hidden:
        return until
    for version in hidden:
        del versions[version]
    time = document.get("time")
    if isinstance(time, dict):
        for version in hidden:
            time.pop(version, None)
    tags = document.get("dist-tags")
    if isinstance(tags, dict):
        document["dist-tags"] = retarget_tags(tags, list(versions), hidden)
    return until


# The configuration file's [policy] table.

class PolicyError(ValueError):
    pass


def parse_deny(table: Mapping[str, Any], where: str, key_where: Any) -> DenyRule:
    """
    One C{[[policy.deny]]} table, checked (C{key_where(key)}: where that
    key is written).
    """
    allowed = ("protocol", "name", "versions", "reason")
    for key, value in table.items():
        if key not in allowed:
            raise PolicyError(f"{key_where(key)}: key {key!r} is not a setting of a deny rule ({', '.join(allowed)}).")
        if not isinstance(value, str) or not value.strip():
            raise PolicyError(f"{key_where(key)}: key {key!r} is a string, not {value!r}.")
    for required in ("protocol", "name"):
        if required not in table:
            raise PolicyError(f"{where}: a deny rule needs {required!r}.")
    if table["protocol"] not in PROTOCOLS:
        raise PolicyError(f"{key_where('protocol')}: key 'protocol' is npm or go, not {table['protocol']!r}.")
    text = table.get("versions", "*")
    try:
        versions = VersionRange.parse(text)
    except InvalidRange:
        raise PolicyError(
            f"{key_where('versions')}: key 'versions' is \"*\", an exact version or a range like "
            f"\"<2.0.0\" or \">=1.2.0 <1.3.0\", not {text!r}."
        ) from None
    reason = table.get("reason", "denied").strip()
    return DenyRule(table["protocol"], table["name"], versions, reason.splitlines()[0], where)


def parse_exempt(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise PolicyError(f"{where} is a list of names, globs or name@version pins, not {value!r}.")
    return tuple(v.strip() for v in value)


def policies(
    npm_min_age: float, go_min_age: float, exempt: Sequence[str], deny: Sequence[DenyRule]
) -> dict[str, Policy]:
    """
    Each protocol's policy from the settings.
    """
    return {
        NPM: Policy(NPM, npm_min_age, tuple(exempt), tuple(r for r in deny if r.protocol == NPM)),
        GO: Policy(GO, go_min_age, tuple(exempt), tuple(r for r in deny if r.protocol == GO)),
    }
