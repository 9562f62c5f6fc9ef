"""The service's logic: routers call these; each takes a session and plain values."""
