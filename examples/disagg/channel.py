"""Control channel of the demo: JSON lines between the driver and its worker processes.

Layer: example. Only small control messages travel here (a prompt, a first token, a report);
the KV cache itself moves through kvxfer. A worker reads commands from stdin and writes events
to stdout; the driver holds each worker as a :class:`WorkerProcess`. Logs go to stderr.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["EXIT", "REPO_ROOT", "Message", "WorkerProcess", "emit", "read_commands"]

Message = dict[str, Any]
REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT = "exit"   # the event a WorkerProcess reports when its process's stdout closes

_emit_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """Worker side: write one event line to stdout (thread-safe)."""
    line = json.dumps({"event": event, **fields})
    with _emit_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def read_commands(inbox: queue.Queue[Message], stream: IO[str] | None = None) -> threading.Thread:
    """Worker side: a daemon thread putting each command read from stdin into ``inbox``.

    At end of input it puts ``{"op": "shutdown"}``, so a worker whose driver died stops too.
    """
    src = stream if stream is not None else sys.stdin

    def run() -> None:
        for line in src:
            if line.strip():
                inbox.put(json.loads(line))
        inbox.put({"op": "shutdown"})

    t = threading.Thread(target=run, name="commands", daemon=True)
    t.start()
    return t


class WorkerProcess:
    """Driver side: one worker subprocess; its events go to a shared queue as ``(name, msg)``."""

    def __init__(self, name: str, module: str, args: Sequence[str], events: queue.Queue[tuple[str, Message]],
                 env: dict[str, str] | None = None):
        self.name = name
        full_env = dict(os.environ)
        # the workers import examples.disagg from this checkout, whatever the caller's cwd
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")]))
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=full_env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._events = events
        self._reader = threading.Thread(target=self._read, name=f"events-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.strip():
                continue
            try:
                self._events.put((self.name, json.loads(line)))
            except json.JSONDecodeError:
                print(f"[{self.name}] {line.rstrip()}", file=sys.stderr)
        self._events.put((self.name, {"event": EXIT, "code": self.proc.wait()}))

    def send(self, op: str, **fields: Any) -> bool:
        """Send one command; False when the worker is gone."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """Ask the worker to shut down, then terminate it if it does not; its exit code."""
        if self.alive():
            self.send("shutdown")
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode
