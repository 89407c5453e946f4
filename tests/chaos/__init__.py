"""Chaos suite: real `crmsync` processes on Redis and PostgreSQL, with faults injected mid-run."""
