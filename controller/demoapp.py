"""The demo's sample application: a small HTTP service keeping notes in SQLite.

`GET /` answers which node serves and how many notes it holds; `POST /notes` adds one (the body is
the text). It is what a user's own database-backed service looks like to Tandem: a process started
by startPrim, its state in files under one directory.
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_handler(db: Path, node: str) -> type[BaseHTTPRequestHandler]:
    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(db, timeout=5)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
        return conn

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, text: str) -> None:
            body = (text + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            with connect() as conn:
                (count,) = conn.execute("SELECT count(*) FROM notes").fetchone()
            self._answer(200, f"{node}: {count} notes")

        def do_POST(self) -> None:
            text = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode(errors="replace")
            with connect() as conn:
                note = conn.execute("INSERT INTO notes (text) VALUES (?)", (text or "note",)).lastrowid
            self._answer(201, f"{node}: note {note} saved")

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    args.db.parent.mkdir(parents=True, exist_ok=True)
    node = os.environ.get("TANDEM_NODE") or socket.gethostname()
    ThreadingHTTPServer(("0.0.0.0", args.port), make_handler(args.db, node)).serve_forever()


if __name__ == "__main__":
    main()
