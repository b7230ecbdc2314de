"""`ReplicatedDir.exclude`: which root-relative paths the primary keeps to itself.

One matcher serves the live path (primary.py), the resync (resync.py) and the native data path's
registrations. A pattern is a glob of `fnmatch` (`*`, `?`, `[...]`) over path components:

- without `/` it matches one component at any depth (`*.tmp`, `cache`);
- with `/` it matches the leading components (`var/cache`, `logs/*.log`), as in a .gitignore;
- `*` never crosses `/`, and a path is excluded when it or any ancestor matches, so an excluded
  directory takes its whole subtree with it.

The secondary needs no patterns: the primary filters its own listings and the secondary's answers.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable


def pattern_error(pattern: str) -> str | None:
    """Why `pattern` is no valid exclude pattern, or None."""
    parts = pattern.rstrip("/").split("/")
    if not pattern or pattern.startswith("/"):
        return f"exclude pattern {pattern!r} must be relative to the directory"
    if any(p in ("", ".", "..") for p in parts):
        return f"exclude pattern {pattern!r} has an empty, '.' or '..' component"
    if "**" in parts:
        return (
            f"exclude pattern {pattern!r}: '**' is not supported; a pattern without '/' already matches "
            "at any depth (write '*.log', not '**/*.log')"
        )
    if "\0" in pattern:
        return f"exclude pattern {pattern!r} contains a NUL byte"
    return None


def _component(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


class Exclude:
    """The compiled patterns; false when there are none (then nothing is ever excluded)."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)
        anywhere: list[str] = []
        self._anchored: list[tuple[re.Pattern[str], ...]] = []
        for pattern in self.patterns:
            error = pattern_error(pattern)
            if error is not None:
                raise ValueError(error)
            parts = pattern.rstrip("/").split("/")
            if len(parts) == 1:
                anywhere.append(fnmatch.translate(parts[0]))
            else:
                self._anchored.append(tuple(_component(p) for p in parts))
        self._anywhere = re.compile("|".join(f"(?:{p})" for p in anywhere)) if anywhere else None

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"Exclude({list(self.patterns)!r})"

    def excluded(self, path: bytes | None) -> bool:
        """Whether the root-relative `path` (b"" is the root, never excluded) or an ancestor matches."""
        if not self.patterns or not path:
            return False
        parts = os.fsdecode(path).split("/")
        if self._anywhere is not None and any(self._anywhere.match(p) for p in parts):
            return True
        return any(
            len(parts) >= len(comps) and all(c.match(p) for c, p in zip(comps, parts, strict=False))
            for comps in self._anchored
        )

    @property
    def anywhere(self) -> bool:
        """Whether a pattern matches names at any depth (one without '/')."""
        return self._anywhere is not None

    def in_reach(self, directory: bytes, *, names: bool = True) -> bool:
        """Whether an entry directly in `directory` may be excluded: the directory is, a pattern
        matches names anywhere, or an anchored one names its children (`cache/*` for `cache`).
        `names` False: leave out the patterns that match names anywhere (the caller matches the
        entry's name against names())."""
        if not self.patterns:
            return False
        if (names and self._anywhere is not None) or self.excluded(directory):
            return True
        parts = os.fsdecode(directory).split("/") if directory else []
        return any(
            len(comps) == len(parts) + 1 and all(c.match(p) for c, p in zip(comps, parts, strict=False))
            for comps in self._anchored
        )

    def names(self) -> list[bytes]:
        """The patterns that match names anywhere, widened for the native data path's matcher (C,
        over bytes): each is a whole name, or the literal prefix before the pattern's first `*?[]`
        and the literal suffix after its last, around one `*` that stands for any bytes
        (`[ab]*.log` is `*.log`). Every name a pattern matches matches its widened form: what comes
        before the first of those characters and after the last is matched character for character
        (a `[...]` set ends at a `]`, an unclosed `[` is itself), and os.fsencode keeps a prefix a
        prefix and a suffix a suffix. A name the widened form matches that the pattern does not is
        only served by Python, which asks excluded()."""
        out = []
        for pattern in self.patterns:
            name = pattern.rstrip("/")
            if "/" in name:
                continue
            meta = [i for i, c in enumerate(name) if c in "*?[]"]
            if not meta:
                out.append(os.fsencode(name))
            else:
                out.append(os.fsencode(name[: meta[0]]) + b"*" + os.fsencode(name[meta[-1] + 1 :]))
        return list(dict.fromkeys(out))

    def kept(self, path: bytes | None) -> bytes | None:
        """`path` if it is replicated, None if it is excluded (as for an inode without a name)."""
        return None if path is not None and self.excluded(path) else path


NOTHING = Exclude()
