"""User-facing error types.

Every mistake a user can make (a bad image, an impossible budget, a wrong config key) raises one of
these with a message that names the input and says what is wrong. The CLI turns any `UniRefError`
into one line on stderr and exit code 2; the server turns it into an HTTP 4xx. Anything else is a
bug in UniRef and keeps its traceback.
"""

from __future__ import annotations


class UniRefError(Exception):
    """Base class of every error caused by user input."""


class ImageInputError(UniRefError):
    """An image file that cannot be used (missing, not an image, truncated, too large...)."""


class BudgetError(UniRefError):
    """A pixel budget that cannot hold the requested images."""


class ConfigError(UniRefError):
    """A config file or override with an unknown key, a wrong type or an invalid value."""


class DataError(UniRefError):
    """A dataset, manifest or row that cannot be read."""


class ModelError(UniRefError):
    """A model name or folder that cannot be loaded."""
