"""Synchronous byte-level replication of a directory: wire protocol, applier, FUSE primary."""
