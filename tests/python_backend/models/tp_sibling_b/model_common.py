"""Beside config.pbtxt (the model folder is on Triton's sys.path too)."""

SHARED = "common-b"
