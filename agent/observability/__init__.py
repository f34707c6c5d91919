"""Logs, metrics and the health/status HTTP endpoints."""
