"""One run per output dir (a lock file with stale-lock detection) and graceful SIGTERM / SIGINT.

``StopSignals``: the first SIGTERM or SIGINT only sets a flag; the trainer finishes the step, writes a
checkpoint and returns, and the CLI exits with 128 + the signal number. A second signal stops at once
(checkpoints are written atomically, so even that never breaks a saved one).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from .errors import TrlVideoError

LOCK_NAME = ".trl-video.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    """``output_dir/.trl-video.lock`` holding {pid, host, started}; created with O_EXCL. A lock whose process
    is gone (same host) is stale and taken over with a note on stderr."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self.enabled = enabled
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        return True

    def acquire(self) -> OutputLock:
        if not self.enabled:
            return self
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrlVideoError(f"output dir '{self.dir}' cannot be created: {exc.strerror}") from None
        if not os.access(self.dir, os.W_OK):
            raise TrlVideoError(f"output dir '{self.dir}' is not writable")
        for _ in range(2):
            if self._create():
                self.held = True
                return self
            try:
                info = json.loads(self.path.read_text())
                pid, host = int(info["pid"]), str(info["host"])
            except (OSError, ValueError, KeyError, TypeError):
                # unreadable: a writer may be between create and write; old enough means it died there
                if time.time() - self.path.stat().st_mtime < 10:
                    raise TrlVideoError(f"output dir '{self.dir}' is being locked by another run "
                                        f"(lock file {self.path})") from None
                pid, host = -1, socket.gethostname()
            if host == socket.gethostname() and (pid < 0 or not _pid_alive(pid)):
                print(f"note: removed the stale lock {self.path} of a run (pid {pid}) that no longer exists",
                      file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            raise TrlVideoError(f"output dir '{self.dir}' is in use by another run (pid {pid} on {host}, lock file "
                                f"{self.path}); if no run is active there, delete the lock file")
        raise TrlVideoError(f"output dir '{self.dir}': could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class StopSignals:
    """Turn the first SIGTERM / SIGINT into a stop request (handlers are installed only in the main thread)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # second signal: stop now, the default way
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step and writing a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def requested(self, accelerator: Any = None) -> int | None:
        """The signal to stop for, agreed by every process (any process that received one stops all)."""
        local = self.received or 0
        if accelerator is not None and accelerator.num_processes > 1:
            import torch

            flag = torch.tensor([local], device=accelerator.device)
            local = int(accelerator.gather(flag).max())
        return local or None
