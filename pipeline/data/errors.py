"""`DataError`: the one error type of the data code (bad input files, shards, settings or output folder)."""

from __future__ import annotations

from pipeline.errors import InputError


class DataError(InputError):
    """Bad input or output for the data commands; the message says what is wrong and how to fix it."""
