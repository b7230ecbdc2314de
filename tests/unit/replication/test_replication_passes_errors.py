"""passes_errors: what a FUSE handler's failure becomes for the application's call."""

from __future__ import annotations

import asyncio
import errno
import logging

import pyfuse3
import pytest

from agent.replication.passthrough import passes_errors
from tests.conftest import ExpectedLogs


@passes_errors
async def _fails(exc: BaseException) -> None:
    raise exc


async def test_an_oserror_keeps_its_errno_and_a_fuse_error_passes_as_it_is() -> None:
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await _fails(FileNotFoundError(errno.ENOENT, "gone"))
    assert raised.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await _fails(pyfuse3.FUSEError(errno.EXDEV))
    assert raised.value.errno == errno.EXDEV


async def test_a_bug_is_answered_with_eio_and_logged_not_left_unanswered(
    caplog: pytest.LogCaptureFixture, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect("a bug in Tandem")
    with caplog.at_level(logging.ERROR, logger="agent.replication"), pytest.raises(pyfuse3.FUSEError) as raised:
        await _fails(AttributeError("'ReplicatedFS' object has no attribute 'x'"))
    assert raised.value.errno == errno.EIO
    assert "FUSE _fails failed (a bug in Tandem); the caller gets EIO" in caplog.text
    assert "AttributeError" in caplog.text


async def test_cancellation_is_not_turned_into_an_answer() -> None:
    with pytest.raises(asyncio.CancelledError):
        await _fails(asyncio.CancelledError())
