"""Locust load tests and concurrency sweeps for saw-router or any OpenAI-compatible server.

`saw-bench` / `python -m saw_loadtest.sweep` is the entry point; see docs/loadtest.md.
"""
