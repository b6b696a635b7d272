"""`lm neighbors`: the tokens whose input embeddings are most similar to a token's."""

from __future__ import annotations

from lm.commands._args import positive_int


def add_parser(subparsers) -> None:
    from lm.checkpoint import DEFAULT_CHECKPOINT

    p = subparsers.add_parser("neighbors", help="tokens with the most similar input embeddings")
    p.add_argument(
        "token", help="a token of the checkpoint's vocabulary (a character for char models)"
    )
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="shipped name or directory")
    p.add_argument("-k", type=positive_int, default=10, help="how many (default 10)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lm.embeddings import nearest_tokens

    neighbors = nearest_tokens(args.checkpoint, args.token, args.k)
    shown = [_show_token(n.token) for n in neighbors]
    width = max(5, *(len(s) for s in shown))
    print(f"{'rank':>4}  {'token':<{width}}  similarity")
    for neighbor, text in zip(neighbors, shown):
        print(f"{neighbor.rank:>4}  {text:<{width}}  {neighbor.similarity:>10.4f}")
    return 0


def _show_token(token: str) -> str:
    """The token as is, or its repr when it holds whitespace or is not printable."""
    if token and token.isprintable() and not any(c.isspace() for c in token):
        return token
    return repr(token)
