"""What the sidecar measures besides a request's timings: resources, GPU memory, Prometheus series, the history
of recent requests, OpenTelemetry."""
