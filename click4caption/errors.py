"""Errors that carry a message meant for the user (one line, no traceback)."""
from __future__ import annotations


class Click4CaptionError(Exception):
    """Base class for errors whose message is shown to the user as is."""


class ConfigError(Click4CaptionError):
    """A configuration file or override is invalid (unknown key, wrong type, missing value)."""


class CheckpointError(Click4CaptionError):
    """A checkpoint or model folder is missing, unreadable or does not match the model."""


class InputError(Click4CaptionError):
    """Bad user input: an unreadable image, a malformed box or question."""


class DataError(Click4CaptionError):
    """A training dataset's files are missing, malformed or (nearly) all broken."""
