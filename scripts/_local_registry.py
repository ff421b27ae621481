"""A throw-away local OCI registry for the scripts (``fleet.py``, ``bench_registry.py``).

Starts Debian's ``docker-registry`` (CNCF distribution) on 127.0.0.1 with a free port and
its storage in a directory of the caller's, plain HTTP (clients pass ``insecure=True``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType


def registry_binary() -> str:
    """The registry binary, or a clear error."""
    path = shutil.which("docker-registry") or (
        "/usr/bin/docker-registry" if Path("/usr/bin/docker-registry").exists() else None
    )
    if path is None:
        msg = "docker-registry is not installed (Debian package 'docker-registry')"
        raise SystemExit(msg)
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalRegistry:
    """``with LocalRegistry(dir) as reg: reg.host`` -> ``"127.0.0.1:PORT"``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> LocalRegistry:
        """Starts the registry and waits (30 s at most) until it answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'storage'}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: refcache-scripts\n"
        )
        log = (self.root / "registry.log").open("ab")
        self.proc = subprocess.Popen(
            [registry_binary(), "serve", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"docker-registry exited; see {self.root / 'registry.log'}"
                raise SystemExit(msg)
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)  # polling another process until it listens
        msg = "docker-registry did not answer within 30 s"
        raise SystemExit(msg)

    def stop(self) -> None:
        """Stops the registry (its storage stays)."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
