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
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def prepare(db: Path) -> None:
    """Create the notes table once, at start; WAL mode is a property of the file and stays set."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(db, timeout=5)) as conn, conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")


def make_handler(db: Path, node: str) -> type[BaseHTTPRequestHandler]:
    def connect() -> sqlite3.Connection:
        return sqlite3.connect(db, timeout=5)

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, text: str) -> None:
            body = (text + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            with closing(connect()) as conn, conn:
                (count,) = conn.execute("SELECT count(*) FROM notes").fetchone()
            self._answer(200, f"{node}: {count} notes")

        def do_POST(self) -> None:
            text = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode(errors="replace")
            with closing(connect()) as conn, conn:
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
    node = os.environ.get("TANDEM_NODE") or socket.gethostname()
    # Listen first: clients that arrive while the database opens wait in the backlog instead of being refused.
    server = ThreadingHTTPServer(("0.0.0.0", args.port), make_handler(args.db, node))
    prepare(args.db)
    server.serve_forever()


if __name__ == "__main__":
    main()
