"""Engine adapters: one module per engine, registered under the entry-point group `sidecar.engines`."""
