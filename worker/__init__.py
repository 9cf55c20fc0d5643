"""tokenq worker: the job path from a Redis stream to a result and a usage event."""
