"""Where a benchmark works: --dir itself, or (--fresh-fs) a new ext4 in a loop-mounted image there.

A long-lived file system remembers its history: ext4 will not reuse an inode freed in the last
minutes (`recently_deleted` in find_inode_bit), so after a test suite or another benchmark deleted
many files, every create scans past them and costs 10-40x more (perf: ~900 µs instead of ~30 µs per
create here). A file system made for the run gives creates the same start every time; but its
fsyncs also pass through the loop device and the host file system (~1 ms instead of ~0.2 ms here),
which flatters every fsync-bound ratio. So the default is the real disk, and --fresh-fs is there
to check the metadata figures.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser, *, fresh_gib: int) -> None:
    """--dir and --fresh-fs, the same for every benchmark."""
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where to work (one disk for all)")
    parser.add_argument(
        "--fresh-fs",
        type=int,
        default=fresh_gib,
        metavar="GIB",
        help=f"work on a new ext4 of GIB GiB in --dir (default {fresh_gib}; 0: in --dir itself)",
    )


# ext4 skips an inode freed less than 60 s ago (360 s while its table block is dirty) when it
# allocates one (recently_deleted in find_inode_bit): creates right after mass deletes scan past them.
RECENTLY_DELETED_SECONDS = 360
_FREED_STAMP = ".tandem-bench-freed"


def wait_for_freed_inodes(parent: Path) -> None:
    """Sleep until the inodes an earlier benchmark freed in `parent` no longer slow new creates."""
    try:
        freed = (parent / _FREED_STAMP).stat().st_mtime
    except FileNotFoundError:
        return
    left = freed + RECENTLY_DELETED_SECONDS - time.time()
    if left > 0:
        at = time.strftime("%H:%M:%S", time.localtime(freed))
        print(
            f"# waiting {left:.0f} s: a benchmark freed its files here at {at} and ext4 skips inodes"
            f" freed in the last {RECENTLY_DELETED_SECONDS} s (recently_deleted)",
            flush=True,
        )
        time.sleep(left)


@contextlib.contextmanager
def work_dir(parent: Path, prefix: str, fresh_gib: int) -> Iterator[Path]:
    """A temporary directory below `parent`; with fresh_gib > 0, on a new ext4 of that many GiB there."""
    if fresh_gib <= 0:
        try:
            with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as tmp:
                yield Path(tmp)
        finally:
            (parent / _FREED_STAMP).touch()  # for wait_for_freed_inodes
        return
    holder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        make_ext4(holder / "fs.img", fresh_gib << 30)
        with loop_mount(holder / "fs.img", holder / "mnt") as mnt:
            work = mnt / "work"
            work.mkdir()
            work.chmod(0o755)
            yield work
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def make_ext4(image: Path, size: int, *, lazy: bool = False) -> None:
    """A new ext4 in a sparse image of `size` bytes (blocks are taken as they are written).

    lazy: leave the inode tables and the journal unzeroed (a small image stays small on its host).
    """
    with open(image, "wb") as f:
        f.truncate(size)
    init = "1" if lazy else "0"
    _run("mkfs.ext4", "-q", "-F", "-E", f"lazy_itable_init={init},lazy_journal_init={init},nodiscard", str(image))


@contextlib.contextmanager
def loop_mount(image: Path, mnt: Path, *options: str) -> Iterator[Path]:
    """Mount the file system in `image` on `mnt` (made if missing) through a loop device freed at unmount."""
    mnt.mkdir(exist_ok=True)
    _run("mount", "-o", ",".join(("loop", *options)), str(image), str(mnt))
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
            _run("umount", "-l", str(mnt))


def describe(parent: Path, fresh_gib: int) -> str:
    """One phrase for the output's machine line."""
    if fresh_gib <= 0:
        return f"disk={parent} (its existing file system)"
    return f"disk=a fresh {fresh_gib} GiB ext4 (loop image in {parent})"


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip() or done.stdout.strip()}")
