"""A loopback fake Hub that serves files for downloads: the real ``huggingface_hub`` client fetches from it."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

COMMIT = "0" * 40


@contextmanager
def serve_repos(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``root/<owner>/<name>/<file>`` at ``/<owner>/<name>/resolve/<rev>/<file>``; yields (url, requests)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _file(self) -> Path | None:
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return None
            path = root / parts[0] / parts[1] / "/".join(parts[4:])
            return path if path.is_file() else None

        def _headers(self, path: Path) -> bytes:
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            return data

        def _missing(self) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:  # noqa: N802
            seen.append(f"HEAD {self.path}")
            path = self._file()
            if path is None:
                return self._missing()
            self._headers(path)

        def do_GET(self) -> None:  # noqa: N802
            seen.append(f"GET {self.path}")
            path = self._file()
            if path is None:
                return self._missing()
            self.wfile.write(self._headers(path))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
