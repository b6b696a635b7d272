"""The one exception type users see: a message they can act on."""


class LMError(Exception):
    """A problem with the user's input, files or settings (not a bug in lm)."""
