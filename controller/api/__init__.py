"""The daemon's HTTP API: REST on /api/v1, /healthz, and the peer sync endpoint."""
