"""Fails on import, as a model with a missing dependency would."""

raise RuntimeError("broken_import cannot be imported on purpose")
