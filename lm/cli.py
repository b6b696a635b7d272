"""The `lm` command: train, eval, generate, serve, checkpoints and more.

Every user mistake becomes one line on stderr and exit status 2, never a traceback.
Each subcommand lives in its own module under lm/commands/.
"""

from __future__ import annotations

import argparse
import sys

from lm.commands import (
    check,
    checkpoints,
    export,
    fewshot_eval,
    generate,
    loadtest,
    make_tasks,
    merge,
    neighbors,
    serve,
    train,
)
from lm.commands import eval as eval_
from lm.errors import LMError

COMMANDS = (
    train,
    eval_,
    generate,
    checkpoints,
    check,
    serve,
    loadtest,
    make_tasks,
    fewshot_eval,
    neighbors,
    export,
    merge,
)


def build_parser() -> argparse.ArgumentParser:
    """The `lm` parser, one subparser per module in COMMANDS."""
    parser = argparse.ArgumentParser(prog="lm", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `lm` subcommand; LMError becomes one line on stderr and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except LMError as exc:
        print(f"lm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
