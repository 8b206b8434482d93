"""Imported only inside execute()."""

NAME = "lazy-b"
