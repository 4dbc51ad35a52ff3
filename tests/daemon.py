"""
Run the real daemon as users do, C{twistd -n contentcache ...}, for tests.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from typing import Sequence

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
_LISTENING = re.compile(rb"Site starting on (\d+)")


class Daemon:
    def __init__(
        self,
        storage: str | None,
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.output = b""
        self.process = subprocess.Popen(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "contentcache",
                "--port",
                "tcp:0:interface=127.0.0.1",
                *(["--storage", storage] if storage is not None else []),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Never the machine's own Go settings: they name public servers.
            env={**os.environ, "GOPROXY": "off", "GOSUMDB": "off", **(env or {})},
            cwd=cwd,
        )
        self.port = int(self.wait_for(_LISTENING)[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self, timeout: float) -> bool:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return True
        chunk = os.read(self.process.stdout.fileno(), 65536)
        self.output += chunk
        return bool(chunk)

    def wait_for(self, pattern: re.Pattern[bytes], timeout: float = 30) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.output)
            if m:
                return m
            if not self._read(0.1):
                break
        raise AssertionError(
            f"daemon never logged {pattern.pattern!r}; output:\n{self.output.decode(errors='replace')}"
        )

    def log(self) -> str:
        """
        Everything the daemon has written so far.
        """
        while self.process.poll() is None and self._read(0.2) and self._pending():
            pass
        return self.output.decode(errors="replace")

    def _pending(self) -> bool:
        assert self.process.stdout is not None
        return bool(select.select([self.process.stdout], [], [], 0.2)[0])

    def terminate(self, timeout: float = 5) -> int:
        """
        SIGTERM, then the exit status (fails if it takes longer than C{timeout}).
        """
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read(0.05)
        if self.process.poll() is None:
            self.stop()
            raise AssertionError(f"daemon still running {timeout} s after SIGTERM")
        while self._read(0):
            pass
        return self.process.returncode

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
