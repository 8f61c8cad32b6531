"""A real `mlflow server` for tests, started through launch/mlflow_server.sh on 127.0.0.1 and a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "mlflow_server.sh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """One server process group; `kill()` simulates a crash (SIGKILL), `start()` again reuses port and store."""

    def __init__(self, directory: Path, port: int | None = None, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.args = tuple(args)  # more options of launch/mlflow_server.sh (--team ...)
        self.env = env  # the script's environment (None: this process's)
        self.process: subprocess.Popen | None = None
        self.log_path = self.directory / "server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        """A client bound to this server for runs and registry alike (never the process-wide URIs)."""
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def start(self, timeout_s: float = 120.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")  # noqa: SIM115 - the server keeps writing to it
        self.process = subprocess.Popen(
            ["bash", str(SCRIPT), "--port", str(self.port), "--dir", str(self.directory), *self.args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.directory, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout_s}s:\n{self.log_path.read_text()[-3000:]}")

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def kill(self) -> None:
        """A crash: the whole process group dies at once."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def api_requests(self) -> list[str]:
        """The access-log lines of REST calls the server answered ("GET /health" excluded)."""
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        return [line for line in lines if '"GET /health' not in line and "/api/" in line]


def running_server(directory: Path) -> Iterator[MlflowServer]:
    """Body of a module-scoped fixture: a started server, stopped afterwards."""
    server = MlflowServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
