"""Telemetry of the daemons: traces, structured logs and Prometheus metrics."""
