"""`lm loadtest`: run service/locustfile.py headless against a server and summarise it."""

from __future__ import annotations

import sys
from pathlib import Path

from lm.commands._args import http_url, positive_float, positive_int, run_time
from lm.errors import LMError
from lm.loadtest import default_locustfile, format_loadtest_summary, read_locust_stats


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "loadtest",
        help="load-test a running server with locust (headless)",
        description="Run service/locustfile.py headless against a server, "
        "write CSV and HTML reports to --out and print a "
        "summary. Exit status 1 when any request failed.",
    )
    p.add_argument(
        "--host",
        type=http_url,
        default="http://127.0.0.1:8000",
        help="server URL (default http://127.0.0.1:8000)",
    )
    p.add_argument("--users", type=positive_int, default=100, help="concurrent users (100)")
    p.add_argument(
        "--spawn-rate", type=positive_float, default=20.0, help="users started per second (20)"
    )
    p.add_argument("--run-time", type=run_time, default="60s", help="60s, 5m, 1h30m (60s)")
    p.add_argument("--out", default="runs/loadtest", help="report directory (runs/loadtest)")
    p.add_argument(
        "--model",
        default=None,
        help="model name to request (LM_MODEL; default shakespeare-char-gpt)",
    )
    p.add_argument("--locustfile", default=None, help="default: service/locustfile.py")
    p.set_defaults(func=run)

    def one_line_error(message: str):  # argparse's usage block would make it several lines
        p.exit(2, f"{p.prog}: error: {message}\n")

    p.error = one_line_error


def run(args) -> int:
    import os
    import subprocess

    locustfile = Path(args.locustfile) if args.locustfile else default_locustfile()
    if not locustfile.is_file():
        raise LMError(f"--locustfile {locustfile}: no such file")
    if not _locust_available():
        raise LMError('locust is not installed; run: pip install -e ".[load]"')
    _check_server(args.host)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats_csv = out / "locust_stats.csv"
    stats_csv.unlink(missing_ok=True)  # never summarise a previous run
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locustfile),
        "--headless",
        "-u",
        str(args.users),
        "-r",
        f"{args.spawn_rate:g}",
        "-t",
        args.run_time,
        "--host",
        args.host,
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
    ]
    env = dict(os.environ)
    if args.model:
        env["LM_MODEL"] = args.model
    print(
        f"lm loadtest: {args.users} users (+{args.spawn_rate:g}/s) for {args.run_time} "
        f"against {args.host}",
        file=sys.stderr,
        flush=True,
    )
    returncode = subprocess.run(command, env=env).returncode
    if not stats_csv.is_file():
        raise LMError(
            f"locust exited with status {returncode} without writing {stats_csv} "
            "(see its output above)"
        )
    rows = read_locust_stats(stats_csv)
    print(format_loadtest_summary(rows))
    print(f"report: {out / 'report.html'}")
    total = rows[-1] if rows else {"failures": 0}
    if total["failures"]:
        print(
            f"lm loadtest: {total['failures']} failed requests "
            f"(details in {out / 'locust_failures.csv'})",
            file=sys.stderr,
        )
        return 1
    if returncode:
        print(
            f"lm loadtest: locust exited with status {returncode} (errors in the locustfile? "
            f"see {out / 'locust_exceptions.csv'})",
            file=sys.stderr,
        )
    return returncode


def _locust_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("locust") is not None


def _check_server(host: str) -> None:
    """Fail fast, in one line, when nothing listens at `host` (any HTTP answer will do)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{host}/health", timeout=5).close()
    except urllib.error.HTTPError:
        pass  # it answered: draining, or behind a key; locust will tell
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LMError(f"no server at {host} ({reason}); start one with `lm serve`") from None
