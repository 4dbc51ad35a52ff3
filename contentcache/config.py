"""
The configuration file (C{--config FILE}, C{CONTENTCACHE_CONFIG}): TOML,
read with the standard library's C{tomllib}, for what does not fit in
flags, and the daemon's options themselves:

    storage = "/var/cache/contentcache"     # any option, by its long name
    max-size = "20GiB"
    workers = 4

    [npm]
    upstream = "https://npm.registry.example/"   # --npm-upstream
    tarball-host = ["cdn.registry.example"]      # repeatable: a list

    [go]
    upstream = "https://goproxy.example"         # --go-upstream
    sumdb = ["sum.golang.org=https://sum.example"]

A flag or environment variable given explicitly wins over the file. A
mistake stops the daemon with one sentence naming the file, the line and
the key.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any, Mapping, Sequence

from attrs import frozen

from .policy import DenyRule, PolicyError, parse_deny, parse_exempt

#: Tables whose keys are the options that start with the table's name.
PROTOCOL_TABLES = ("npm", "go")


class ConfigError(ValueError):
    """
    A mistake in the configuration file, in one sentence.
    """


@frozen
class Setting:
    """
    One option set by the file: its long name, its values as the command
    line would give them, and where it was written.
    """

    option: str
    values: list[str]
    line: int
    key: str


@frozen
class Route:
    """
    One C{[[npm.routes]]}: which packages, where from, with which
    credentials (named, never held: an environment variable or a file),
    and who may have what was fetched.
    """

    patterns: list[str]
    upstream: str
    token_env: str | None = None
    token_file: str | None = None
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    tarball_hosts: list[str] = []
    access: str = "token"
    #: "FILE, line N", where it is written.
    where: str = ""
    #: "FILE, line N" of each of its keys.
    lines: dict[str, str] = {}

    def at(self, key: str) -> str:
        return self.lines.get(key, self.where)


#: A route's keys, by the kind of value each takes.
_ROUTE_STRINGS = ("upstream", "token_env", "token_file", "username", "password_env", "password_file", "access")
_ROUTE_LISTS = ("tarball_hosts",)
#: Keys that would put a secret in the file itself.
_SECRETS = ("token", "password", "secret", "auth", "authorization")


@frozen
class ConfigFile:
    path: str
    settings: list[Setting]
    npm_routes: list[Route] = []
    go_routes: list[Route] = []
    #: [policy.min_age] exempt: names, globs and name@version pins.
    exempt: list[str] = []
    #: [[policy.deny]]
    deny: list[DenyRule] = []

    def where(self, option: str) -> str | None:
        """
        "FILE, line N: key 'K'" for an option the file sets, else L{None}.
        """
        for setting in self.settings:
            if setting.option == option:
                return f"{self.path}, line {setting.line}: key {setting.key!r}"
        return None


def _line_of(text: str, table: Sequence[str], key: str) -> int:
    """
    The line that sets C{key} in C{table} (the file's own lines: tomllib
    says where a syntax error is, not where a value came from).
    """
    current: list[str] = []
    header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    for number, line in enumerate(text.splitlines(), start=1):
        m = header.match(line)
        if m:
            current = [part.strip().strip('"') for part in m[1].split(".")]
            continue
        m = re.match(r'^\s*("?)([A-Za-z0-9_.-]+)\1\s*=', line)
        if m and current == list(table) and m[2] == key:
            return number
    return 1


def _as_arguments(value: Any, repeatable: bool) -> list[str] | None:
    """
    A TOML value as command-line values, or L{None} if it cannot be one.
    """
    if isinstance(value, bool):
        return [str(value).lower()]
    if isinstance(value, (str, int, float)):
        return [str(value)]
    if isinstance(value, list) and repeatable and all(isinstance(v, (str, int)) for v in value):
        return [str(v) for v in value]
    return None


def load(path: str, options: Sequence[str], repeatable: Sequence[str], flags: Sequence[str]) -> ConfigFile:
    """
    Read the configuration file at C{path}, knowing the daemon's long
    C{options} (of which C{repeatable} take a list) and its C{flags}.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"Cannot read the configuration file {path}: {e.strerror}.") from None
    text = raw.decode("utf-8", "replace")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        m = re.search(r"\(at line (\d+), column \d+\)$", message)
        if m:
            message = message[: m.start()].strip()
            raise ConfigError(f"{path}, line {m[1]}: this is not TOML ({message}).") from None
        raise ConfigError(f"{path}: this is not TOML ({message}).") from None
    known = set(options) | set(flags)
    settings: list[Setting] = []
    npm_routes: list[Route] = []
    go_routes: list[Route] = []
    exempt: list[str] = []
    deny: list[DenyRule] = []
    lines = text.splitlines()

    def table_lines(header: str, line: int) -> list[tuple[int, Any]]:
        """
        For each C{[[header]]} table: its header's line and a function
        finding the line of one of its keys.
        """
        starts = [n for n, text_line in enumerate(lines, start=1)
                  if re.match(rf"^\s*\[\[\s*{re.escape(header)}\s*\]\]", text_line)]
        out = []
        for i in range(len(starts) or 1):
            at = starts[i] if i < len(starts) else line
            end = starts[i + 1] if i + 1 < len(starts) else len(lines) + 1

            def key_line(key: str, at: int = at, end: int = end) -> int:
                for number in range(at + 1, end):
                    if re.match(rf'^\s*"?{re.escape(key)}"?\s*=', lines[number - 1]):
                        return number
                return at

            out.append((at, key_line))
        return out

    def policy(value: Mapping[str, Any]) -> None:
        for key, inner in value.items():
            at_line = _line_of(text, ["policy"], key)
            if key == "min_age" and isinstance(inner, dict):
                for setting, listed in inner.items():
                    place = f"{path}, line {_line_of(text, ['policy', 'min_age'], setting)}: key {setting!r}"
                    if setting != "exempt":
                        raise ConfigError(f"{place} is not a setting of [policy.min_age] (exempt; the ages are "
                                          "npm-min-age and go-min-age).")
                    try:
                        exempt.extend(parse_exempt(listed, place))
                    except PolicyError as e:
                        raise ConfigError(str(e)) from None
            elif key == "deny" and isinstance(inner, list) and all(isinstance(t, dict) for t in inner):
                found = table_lines("policy.deny", at_line)
                for i, rule in enumerate(inner):
                    at, key_line = found[i] if i < len(found) else found[-1]
                    try:
                        deny.append(parse_deny(rule, f"{path}, line {at}",
                                               lambda k, key_line=key_line: f"{path}, line {key_line(k)}"))
                    except PolicyError as e:
                        raise ConfigError(str(e)) from None
            else:
                raise ConfigError(f"{path}, line {at_line}: key {key!r} in [policy] is [policy.min_age] (exempt) or "
                                  "[[policy.deny]] tables.")

    def routes(protocol: str, value: Any, line: int) -> None:
        where = f"{path}, line {line}: key 'routes'"
        if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
            raise ConfigError(f"{where} is a list of tables: write each as [[{protocol}.routes]].")
        made = npm_routes if protocol == "npm" else go_routes
        found = table_lines(f"{protocol}.routes", line)
        for i, table in enumerate(value):
            at, key_line = found[i] if i < len(found) else found[-1]
            made.append(_route(table, path, at, key_line, "packages" if protocol == "npm" else "modules"))

    def take(table: Sequence[str], items: Mapping[str, Any], prefix: str) -> None:
        for key, value in items.items():
            line = _line_of(text, table, key)
            where = f"{path}, line {line}: key {key!r}"
            option = prefix + key.replace("_", "-")
            if isinstance(value, dict) and not table and key in PROTOCOL_TABLES:
                take([key], value, f"{key}-")
                continue
            if isinstance(value, dict) and not table and key == "policy":
                policy(value)
                continue
            if isinstance(value, dict) and not table and key == "access":
                # [access] default = "token", metrics = "token", ui = "token"
                for inner, setting in value.items():
                    inner_line = _line_of(text, ["access"], inner)
                    named = {"default": "access", "metrics": "metrics-access", "ui": "ui-access"}.get(inner)
                    if named is None or not isinstance(setting, str):
                        raise ConfigError(f"{path}, line {inner_line}: key {inner!r} in [access] is default, "
                                          "metrics or ui, each public or token.")
                    settings.append(Setting(named, [setting], inner_line, inner))
                continue
            if len(table) == 1 and table[0] in PROTOCOL_TABLES and key == "routes":
                routes(table[0], value, line)
                continue
            if option in ("config",) or option not in known:
                raise ConfigError(f"{where} is not a setting of contentcache (twistd contentcache --help lists them).")
            if option in flags:
                if not isinstance(value, bool):
                    raise ConfigError(f"{where} is true or false, not {value!r}.")
                if value:
                    settings.append(Setting(option, [], line, key))
                continue
            arguments = _as_arguments(value, option in repeatable)
            if arguments is None:
                kind = "a value or a list of values" if option in repeatable else "one value"
                raise ConfigError(f"{where} takes {kind}, not {type(value).__name__} {value!r}.")
            settings.append(Setting(option, arguments, line, key))

    take([], document, "")
    return ConfigFile(path, settings, npm_routes, go_routes, exempt, deny)


def _route(table: Mapping[str, Any], path: str, header: int, key_line: Any, names: str) -> Route:
    """
    One route's table, checked; C{header} is its header's line, and
    C{key_line} finds the line of one of its keys.
    """
    where = f"{path}, line {header}"
    values: dict[str, Any] = {}
    for key, value in table.items():
        at = f"{path}, line {key_line(key)}"
        if key in _SECRETS:
            raise ConfigError(
                f"{at}: key {key!r}: a secret never goes in this file: name an environment variable "
                f"({key}_env) or a file ({key}_file) that holds it."
            )
        if key in _ROUTE_STRINGS:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{at}: key {key!r} is a string, not {type(value).__name__}.")
            if key.endswith("_env") and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
                # Not repeated: it may be the secret itself, put in the wrong place.
                raise ConfigError(f"{at}: key {key!r} names an environment variable (letters, digits and _), "
                                  "not a secret.")
        elif (key in _ROUTE_LISTS and names == "packages") or key == names:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{at}: key {key!r} is a list of strings, not {value!r}.")
        else:
            extra = ("tarball_hosts",) if names == "packages" else ()
            raise ConfigError(f"{at}: key {key!r} is not a setting of a route "
                              f"({', '.join((names,) + _ROUTE_STRINGS + extra)}).")
        values[key] = value
    for required in (names, "upstream"):
        if required not in values:
            raise ConfigError(f"{where}: a route needs {required!r}.")
    upstream_at = f"{path}, line {key_line('upstream')}"
    if not re.match(r"^https?://[^/]", values["upstream"]):
        raise ConfigError(f"{upstream_at}: key 'upstream' is an http:// or https:// address.")
    if "@" in values["upstream"].split("/")[2]:
        raise ConfigError(f"{upstream_at}: key 'upstream' must not hold credentials: give username with "
                          "password_env or password_file, or token_env or token_file.")
    ways = [k for k in ("token_env", "token_file") if k in values]
    basic = [k for k in ("password_env", "password_file") if k in values]
    if len(ways) > 1 or len(basic) > 1 or (ways and (basic or "username" in values)):
        raise ConfigError(f"{where}: give one credential: token_env or token_file (Bearer), or username with "
                          "password_env or password_file (Basic).")
    if ("username" in values) != bool(basic):
        raise ConfigError(f"{where}: Basic needs both username and password_env (or password_file).")
    if values.get("access", "token") not in ("token", "public"):
        raise ConfigError(f"{path}, line {key_line('access')}: key 'access' is token or public, "
                          f"not {values['access']!r}.")
    patterns = values.pop(names)
    lines = {key: f"{path}, line {key_line(key)}" for key in table}
    return Route(patterns=patterns, where=where, lines=lines, **values)
