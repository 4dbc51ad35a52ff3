"""
The C{contentcache} command.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import __version__


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    # twistd is the one way the daemon runs; this saves typing "-n".
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    argv = [twistd, "--nodaemon", "--pidfile=", "contentcache", *rest]
    os.execv(twistd, argv)
    return 1  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="contentcache",
        description="A pull-through cache for npm and Go modules.",
    )
    parser.add_argument("--version", action="version", version=f"contentcache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the daemon in the foreground (the same as twistd -n contentcache)",
        add_help=False,
    )
    serve.set_defaults(run=_serve)
    args, rest = parser.parse_known_args(argv)
    return int(args.run(args, rest))


if __name__ == "__main__":
    sys.exit(main())
