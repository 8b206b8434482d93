"""Convoy: a high-throughput Open Inference Protocol server."""

__version__ = "0.1.0"
