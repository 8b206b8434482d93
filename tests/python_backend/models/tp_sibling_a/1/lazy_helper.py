"""Imported only inside execute()."""

NAME = "lazy-a"
