"""Exceptions raised by :mod:`modlens.data`."""

from __future__ import annotations


class DataError(Exception):
    """Base class of the data-loading errors."""


class DataUnavailableError(DataError, FileNotFoundError):
    """Dataset files are missing and could not be downloaded."""


class DataCorruptError(DataError, ValueError):
    """A dataset file is present but damaged: wrong checksum, broken gzip stream or bad IDX layout."""
