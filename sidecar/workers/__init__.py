"""Data-plane workers (`SIDECAR_WORKERS` > 1): the pool the supervisor's process keeps, a worker's view of the
engine, and the memory they share."""
