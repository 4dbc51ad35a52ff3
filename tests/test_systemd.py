"""
The systemd units verify, and the daemon runs as systemd starts it: a
listening socket handed over by name, and READY=1 on the notify socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest

from .daemon import TWISTD
from .test_goproxy import request

UNITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "systemd")
INSTALLED = "/opt/contentcache"


def test_units_verify(tmp_path: Any) -> None:
    if shutil.which("systemd-analyze") is None:  # pragma: no cover - Debian ships it with systemd
        pytest.fail("systemd-analyze is missing: run the README's test command", pytrace=False)
    # The service runs /opt/contentcache/bin/twistd: stand this test's
    # environment there if nothing is installed yet.
    placed = False
    if not os.path.exists(INSTALLED):
        os.symlink(sys.prefix, INSTALLED)
        placed = True
    try:
        result = subprocess.run(
            ["systemd-analyze", "verify",
             os.path.join(UNITS, "contentcache.socket"), os.path.join(UNITS, "contentcache.service")],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        if placed:
            os.unlink(INSTALLED)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == ""


def test_socket_activation_and_notify(tmp_path: Any) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(30)

    def as_systemd_does() -> None:
        os.dup2(listener.fileno(), 3)  # the first passed descriptor

    env = {
        **os.environ, "GOPROXY": "off", "GOSUMDB": "off",
        "LISTEN_FDS": "1", "LISTEN_FDNAMES": "contentcache", "NOTIFY_SOCKET": notify_path,
    }
    process = subprocess.Popen(
        # LISTEN_PID must be the daemon's own pid: the shell's, kept by exec.
        ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", TWISTD, "-n", "--pidfile=", "contentcache",
         "--port", "systemd:domain=INET:name=contentcache", "--storage", str(tmp_path / "storage")],
        env=env, preexec_fn=as_systemd_does, pass_fds=(3,),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    listener.close()  # only the daemon holds it now
    try:
        assert notify.recv(4096) == b"READY=1"
        status, _, body = request(f"http://127.0.0.1:{port}", "/health")
        assert status == 200 and b'"ok"' in body
        process.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()
        notify.close()
