"""The cluster secret: the key every node shares, and the signatures made with it."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

KEY_BYTES = 32
MAX_SKEW_SECONDS = 60.0


class SecretError(Exception):
    """The key file is unusable, or a signature does not verify."""


def key_path(state_dir: Path, secret_file: str | None) -> Path:
    return Path(secret_file) if secret_file else state_dir / "cluster.key"


def load_key(path: Path) -> bytes | None:
    """The key in ``path``, or None when there is no key file (an unauthenticated lab)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SecretError(f"cannot read the cluster key {path}: {exc.strerror}") from None
    key = data.strip()
    if len(key) < 16:
        raise SecretError(f"the cluster key {path} is too short ({len(key)} bytes, at least 16): run `tandem keygen`")
    return key


def generate_key(path: Path, *, force: bool = False) -> None:
    """Write a new random key readable by root only; refuse to replace one unless ``force``."""
    if path.exists() and not force:
        raise SecretError(f"{path} already exists: every node must hold the same key (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(KEY_BYTES) + "\n")


def sign(key: bytes, body: bytes, *, now: float | None = None) -> str:
    """A header value ``<unix time>:<hex HMAC-SHA256 of time and body>``."""
    stamp = f"{now if now is not None else time.time():.3f}"
    mac = hmac.new(key, stamp.encode() + b"\n" + body, hashlib.sha256).hexdigest()
    return f"{stamp}:{mac}"


def verify(key: bytes, body: bytes, header: str | None, *, now: float | None = None) -> None:
    """Raise ``SecretError`` unless ``header`` signs ``body`` with ``key`` within the allowed clock skew."""
    if not header or ":" not in header:
        raise SecretError("the request is not signed with the cluster key")
    stamp, mac = header.split(":", 1)
    expected = hmac.new(key, stamp.encode() + b"\n" + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, expected):
        raise SecretError("the request's signature does not match the cluster key")
    try:
        skew = abs((now if now is not None else time.time()) - float(stamp))
    except ValueError:
        raise SecretError("the request's signature has no valid time") from None
    if skew > MAX_SKEW_SECONDS:
        raise SecretError(
            f"the request was signed {skew:.0f}s away from this node's clock (at most {MAX_SKEW_SECONDS:.0f}s)"
        )
