"""The HTTP layer: translates HTTP requests to engine calls and back."""
