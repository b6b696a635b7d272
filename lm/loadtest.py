"""Load-test reports: where the locustfile lives and what locust's CSV says."""

from __future__ import annotations

import csv
from pathlib import Path


def default_locustfile() -> Path:
    """service/locustfile.py, installed next to the `lm` package."""
    return Path(__file__).resolve().parent.parent / "service" / "locustfile.py"


def read_locust_stats(path: Path) -> list[dict]:
    """Locust's *_stats.csv as one dict per endpoint, the `Aggregated` row last."""

    def number(value: str) -> float | None:
        try:
            return float(value)
        except (TypeError, ValueError):
            return None  # N/A when an endpoint saw no request

    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows.append(
                {
                    "name": " ".join(p for p in (row.get("Type"), row.get("Name")) if p),
                    "requests": int(row["Request Count"]),
                    "failures": int(row["Failure Count"]),
                    "rps": number(row["Requests/s"]) or 0.0,
                    "p50_ms": number(row.get("50%")),
                    "p99_ms": number(row.get("99%")),
                }
            )
    rows.sort(key=lambda r: r["name"] == "Aggregated")
    return rows


def format_loadtest_summary(rows: list[dict]) -> str:
    """A table of requests, failures, requests/s and latency percentiles per endpoint."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    width = max([len(r["name"]) for r in rows] + [8])
    lines = [
        f"{'endpoint':<{width}} {'requests':>9} {'failures':>9} {'req/s':>8} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['name']:<{width}} {r['requests']:>9,} {r['failures']:>9,} "
            f"{r['rps']:>8.1f} {ms(r['p50_ms']):>8} {ms(r['p99_ms']):>8}"
        )
    return "\n".join(lines)
