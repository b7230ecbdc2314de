"""bench/fuse_profile.py reads `perf script` output of the kernel's FUSE tracepoints, one mount at a time."""

from bench.fuse_profile import parse

# As `perf script -F time,event,trace` prints them (Linux 6.18, perf 6.1).
LINES = """\
 49368.476093: fuse:fuse_request_send: connection 39 req 6 opcode 16 (FUSE_WRITE) len 4176
 49368.476393:  fuse:fuse_request_end: connection 39 req 6 len 24 error 0
 49368.476400: fuse:fuse_request_send: connection 41 req 6 opcode 1 (FUSE_LOOKUP) len 43
 49368.476500:  fuse:fuse_request_end: connection 41 req 6 len 144 error 0
 49368.476475: fuse:fuse_request_send: connection 39 req 8 opcode 20 (FUSE_FSYNC) len 56
 49368.477475:  fuse:fuse_request_end: connection 39 req 8 len 16 error 0
 49368.477500: fuse:fuse_request_send: connection 39 req 10 opcode 16 (FUSE_WRITE) len 4176
 49368.477600:  fuse:fuse_request_end: connection 39 req 10 len 24 error 0
 49368.477700:  fuse:fuse_request_end: connection 39 req 12 len 24 error 0
""".splitlines()


def test_requests_are_counted_and_timed_per_kind_for_one_connection_only() -> None:
    profile = parse(iter(LINES), 39, operations=2)
    assert sorted(profile.kinds) == ["FSYNC", "WRITE"] and profile.requests == 3
    assert profile.kinds["WRITE"][0] == 2 and profile.kinds["FSYNC"][0] == 1
    assert round(profile.kinds["WRITE"][1] * 1e6) == 400
    assert round(profile.kinds["FSYNC"][1] * 1e6) == 1000
    assert profile.render() == "1.50 per operation: FSYNC 0.50 (1000 µs), WRITE 1.00 (200 µs)"


def test_rare_kinds_are_summed_as_other() -> None:
    profile = parse(iter(LINES), 39, operations=40)
    assert profile.render() == "0.07 per operation: WRITE 0.05 (200 µs), other 0.03"


def test_a_workload_without_operations_renders_a_dash() -> None:
    assert parse(iter(LINES), 39, operations=0).render() == "-"
