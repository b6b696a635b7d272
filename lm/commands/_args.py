"""Argparse types shared by the commands: each turns a bad value into a one-line error."""

from __future__ import annotations

import argparse
import re
from urllib.parse import urlparse

MAX_NEW_TOKENS_LIMIT = 100_000


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def escaped(text: str) -> str:
    """Text typed in a shell, with the escapes `\\n` (line end), `\\t` (tab) and `\\\\`
    (a backslash) turned into the characters: `--template "{input}: {output}\\n"` means a
    line end, as it does in the API's JSON. Other backslashes stay as typed."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m[1]], text)


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def finite_float(text: str) -> float:
    """A number that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def unit_interval(text: str) -> float:
    """A number in (0, 1]."""
    value = finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def max_new_tokens(text: str) -> int:
    """A positive whole number up to MAX_NEW_TOKENS_LIMIT."""
    value = positive_int(text)
    if value > MAX_NEW_TOKENS_LIMIT:
        raise argparse.ArgumentTypeError(f"at most {MAX_NEW_TOKENS_LIMIT:,}, got {value:,}")
    return value


def run_time(text: str) -> str:
    """Locust's duration: `90`, `60s`, `5m`, `1h30m`."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())
    if text.strip().isdigit():
        seconds = int(text)
    elif match and text.strip():
        hours, minutes, secs = (int(g or 0) for g in match.groups())
        seconds = 3600 * hours + 60 * minutes + secs
    else:
        raise argparse.ArgumentTypeError(f"expected a duration like 60s, 5m or 1h30m, got {text!r}")
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1s, got {text!r}")
    return text.strip()


def http_url(text: str) -> str:
    """An http(s) URL with a host, without its trailing slash."""
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError(f"expected a URL like http://127.0.0.1:8000, got {text!r}")
    return text.rstrip("/")


def shots_list(text: str) -> list[int]:
    """Comma-separated numbers of few-shot examples, sorted and deduplicated."""
    parts = [part.strip() for part in text.split(",")]
    try:
        shots = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers like 0,1,2,4,8, got {text!r}"
        ) from None
    if any(s < 0 for s in shots):
        raise argparse.ArgumentTypeError(f"shots must be >= 0, got {text!r}")
    return sorted(set(shots))
