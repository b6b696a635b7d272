"""`lm serve`: serve checkpoints over an OpenAI-compatible HTTP API.

The flags are generated from the server's Settings (service/settings.py), so each flag and
its `LM_*` environment variable are one field and cannot drift apart.
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from service.settings import add_arguments

    p = subparsers.add_parser(
        "serve",
        help="serve checkpoints over an OpenAI-compatible HTTP API",
        description="Every flag also reads from an LM_* environment variable "
        "(LM_HOST, LM_PORT, LM_CHECKPOINTS, LM_API_KEY, ...); a flag wins over its variable.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from service.app import run as serve
    from service.settings import settings_from_args

    return serve(settings_from_args(args))
