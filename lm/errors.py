"""The one exception type users see: a message they can act on."""

from __future__ import annotations


class LMError(Exception):
    """A problem with the user's input, files or settings (not a bug in lm).

    `param` names the input at fault (a request field, a sampling parameter), so that the
    server can report it without reading the message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
