"""lm: train small language models on your own text and serve them."""

__version__ = "0.1.0"
