"""
npm package names and tarball file names, as they arrive in request paths.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from attrs import frozen

MAX_NAME = 214
# Old packages may have upper case; new ones may not, but a cache must
# serve both. No leading dot or underscore, URL-safe characters only.
_PART = re.compile(r"[A-Za-z0-9~-][A-Za-z0-9._~-]*")
_SCOPE = re.compile(r"@[A-Za-z0-9~-][A-Za-z0-9._~-]*")


class InvalidName(ValueError):
    pass


@frozen
class PackageName:
    """
    A package name: C{name} or C{@scope/name}.
    """

    scope: str | None
    base: str

    @classmethod
    def parse(cls, text: str) -> PackageName:
        if not text or len(text) > MAX_NAME:
            raise InvalidName("invalid package name")
        scope, slash, base = text.rpartition("/")
        if slash:
            if _SCOPE.fullmatch(scope) is None:
                raise InvalidName("invalid package scope")
        else:
            scope = ""
        if _PART.fullmatch(base) is None or base in ("node_modules", "favicon.ico"):
            raise InvalidName("invalid package name")
        return cls(scope or None, base)

    @property
    def full(self) -> str:
        return f"{self.scope}/{self.base}" if self.scope else self.base

    @property
    def path(self) -> str:
        """
        How a registry's URL names the packument: C{@scope%2fname}.
        """
        return quote(self.full, safe="@")

    def __str__(self) -> str:
        return self.full


def split_request(segments: list[str]) -> tuple[PackageName, list[str]]:
    """
    The package a request path names and the segments after it. A scoped
    name arrives as one segment (C{@scope%2fname}, already unquoted to
    C{@scope/name}) or as two (C{@scope/name}).
    """
    if not segments or not segments[0]:
        raise InvalidName("no package name")
    first = segments[0]
    if first.startswith("@") and "/" not in first:
        if len(segments) < 2:
            raise InvalidName("a scope without a package name")
        return PackageName.parse(f"{first}/{segments[1]}"), segments[2:]
    if "/" in first and not first.startswith("@"):
        raise InvalidName("invalid package name")
    return PackageName.parse(first), segments[1:]


def check_tarball_file(name: PackageName, file: str) -> str:
    """
    A tarball's file name: C{<base>-<version>.tgz}.
    """
    if not file.endswith(".tgz") or not file.startswith(name.base + "-") or "/" in file:
        raise InvalidName("invalid tarball name")
    version = file[len(name.base) + 1 : -len(".tgz")]
    if not version or _PART.fullmatch(version.replace("+", "")) is None:
        raise InvalidName("invalid tarball version")
    return file
