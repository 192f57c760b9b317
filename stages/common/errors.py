"""The one error type for input tiflow refuses: every stage raises it, and every command line turns it into one line.

The message says what is wrong, with which key or file, and what to do about it.
"""


class InputError(ValueError):
    """A config value, file or setting that tiflow refuses."""


class MissingInput(InputError, FileNotFoundError):
    """A file or folder the input names that is not there (also a FileNotFoundError, for callers that expect one)."""
