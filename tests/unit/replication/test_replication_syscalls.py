"""syscalls.keep_large_buffers: glibc accepts both malloc settings (a wrong parameter code returns 0)."""

from __future__ import annotations

import platform

import pytest

from agent.replication import syscalls


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_mmap_and_trim_thresholds() -> None:
    assert syscalls.keep_large_buffers() is True
    big = [bytes(1 << 20) for _ in range(8)]  # 1 MiB buffers still allocate and free normally
    assert sum(map(len, big)) == 8 << 20
