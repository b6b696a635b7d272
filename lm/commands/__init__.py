"""One module per `lm` subcommand, each with `add_parser(subparsers)` and `run(args) -> int`.

A command parses flags, calls the library and prints; the work itself lives in `lm/`.
"""
