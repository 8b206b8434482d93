"""A sibling module; tp_sibling_a and tp_sibling_b each have one of this name."""

NAME = "helper-a"
