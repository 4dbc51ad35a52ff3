"""
Module paths and versions as the GOPROXY protocol writes them: the case
encoding (C{!x} for C{X}), the module path rules, and canonical versions.

The rules follow golang.org/x/mod/module (CheckPath, EscapePath) and
golang.org/x/mod/semver, restricted to what a proxy needs to decide: is
this a request we may forward and cache, and under which name.
"""

from __future__ import annotations

import fnmatch
import re

from attrs import frozen

#: Longest module path we accept; the longest real ones are far shorter.
MAX_PATH = 1024
_PATH_CHARS = re.compile(r"[A-Za-z0-9._~-]+")
# A semantic version as the go command writes one, with the optional
# "+incompatible" a module without a go.mod at major version 2+ carries.
_CANONICAL = re.compile(
    r"v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+incompatible)?"
)
_WINDOWS_RESERVED = {
    "con", "prn", "aux", "nul",
    *(f"com{i}" for i in range(1, 10)),
    *(f"lpt{i}" for i in range(1, 10)),
}


class InvalidPath(ValueError):
    """
    Not a module path or version the GOPROXY protocol allows.
    """


def unescape(escaped: str, what: str = "module path") -> str:
    """
    Undo the case encoding: C{!x} stands for C{X}, and an escaped string
    has no upper-case letters of its own.
    """
    out = []
    bang = False
    for c in escaped:
        if bang:
            if not "a" <= c <= "z":
                raise InvalidPath(f"invalid {what}: '!' must be followed by a lower-case letter")
            out.append(c.upper())
            bang = False
        elif c == "!":
            bang = True
        elif "A" <= c <= "Z":
            raise InvalidPath(f"invalid {what}: upper-case letters must be escaped as '!' and lower case")
        else:
            out.append(c)
    if bang:
        raise InvalidPath(f"invalid {what}: it ends in '!'")
    return "".join(out)


def escape(text: str) -> str:
    """
    The case encoding of a module path or version.
    """
    return "".join("!" + c.lower() if "A" <= c <= "Z" else c for c in text)


def _check_element(element: str, first: bool) -> None:
    if not element:
        raise InvalidPath("invalid module path: empty path element")
    if _PATH_CHARS.fullmatch(element) is None:
        raise InvalidPath("invalid module path: a path element has a character outside A-Z a-z 0-9 . _ ~ -")
    if element.startswith(".") or element.endswith("."):
        raise InvalidPath("invalid module path: a path element starts or ends with a dot")
    if element.split(".", 1)[0].lower() in _WINDOWS_RESERVED:
        raise InvalidPath("invalid module path: a path element is a reserved file name")
    if first:
        if "." not in element:
            raise InvalidPath("invalid module path: the first element must contain a dot")
        if element.startswith("-"):
            raise InvalidPath("invalid module path: the first element starts with '-'")
        if re.fullmatch(r"[a-z0-9.-]+", element) is None:
            raise InvalidPath("invalid module path: the first element may hold only a-z 0-9 . -")


def check_module_path(path: str) -> str:
    """
    Validate a decoded module path (module.CheckPath's rules).
    """
    if len(path) > MAX_PATH:
        raise InvalidPath("invalid module path: too long")
    elements = path.split("/")
    for i, element in enumerate(elements):
        _check_element(element, first=i == 0)
    return path


def check_version(version: str) -> str:
    """
    Validate a decoded version or version query (a single path element).
    """
    if not version or len(version) > 256:
        raise InvalidPath("invalid version")
    if _PATH_CHARS.fullmatch(version.replace("+", "")) is None or version in (".", ".."):
        raise InvalidPath("invalid version: a character outside A-Z a-z 0-9 . _ ~ + -")
    return version


def is_canonical(version: str) -> bool:
    """
    Whether C{version} is a canonical semantic version (v1.2.3, with an
    optional pre-release and +incompatible): the only versions whose
    .info, .mod and .zip never change.
    """
    return _CANONICAL.fullmatch(version) is not None


@frozen
class Module:
    """
    A module path in both forms.
    """

    path: str
    escaped: str

    @classmethod
    def parse(cls, escaped: str) -> Module:
        return cls(check_module_path(unescape(escaped)), escaped)


@frozen
class Version:
    name: str
    escaped: str

    @classmethod
    def parse(cls, escaped: str) -> Version:
        return cls(check_version(unescape(escaped, "version")), escaped)

    @property
    def canonical(self) -> bool:
        return is_canonical(self.name)


def match_prefix_patterns(patterns: str, path: str) -> bool:
    """
    module.MatchPrefixPatterns: whether C{path} or a prefix of it (whole
    path elements) matches one of the comma-separated glob C{patterns}, as
    GOPRIVATE and GONOSUMDB are read.
    """
    elements = path.split("/")
    for pattern in patterns.split(","):
        pattern = pattern.strip().strip("/")
        if not pattern:
            continue
        parts = pattern.split("/")
        if len(parts) <= len(elements) and all(
            fnmatch.fnmatchcase(e, p) for e, p in zip(elements, parts)
        ):
            return True
    return False
