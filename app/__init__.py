"""crosspatch service: HTTP API, auth, durable job queue, workers, storage, and the CLI."""
