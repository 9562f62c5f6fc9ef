"""The durable job queue on the SQL job store: claim, lease, heartbeat, requeue, finish."""
