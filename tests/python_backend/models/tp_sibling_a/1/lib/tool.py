"""A sub-package module importing a sibling of the version folder by its absolute name."""

from helper import NAME as HELPER_NAME

TOOL = "tool-" + HELPER_NAME
