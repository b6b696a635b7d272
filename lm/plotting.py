"""matplotlib, an optional extra (`lm[plot]`): the one place that imports it."""

from __future__ import annotations

from lm.errors import LMError

MISSING = "plotting needs matplotlib, which is not installed: pip install 'lm[plot]'"


def pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend; LMError naming the extra if missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise LMError(MISSING) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
