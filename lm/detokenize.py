"""A sequence's generated text: decoded token by token, ended at the earliest stop sequence.

The engine pushes each sampled token; this module says what text exists, whether a stop
sequence ended it, and how much of its tail must be held back from a stream because it
could still become a stop sequence.
"""

from __future__ import annotations

from lm.tokenizers import IncrementalDecoder, Tokenizer


class TextTracker:
    """Generated ids -> text, cut at the earliest stop sequence."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stops: list[str]):
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self.prompt_ids = prompt_ids
        self.stops = stops
        self.text = ""  # all generated text so far (up to a stop sequence, once one is found)

    def push(self, token_id: int) -> tuple[bool, int]:
        """Add a token's text; return (a stop sequence ended the text, characters to hold)."""
        before = len(self.text)
        self.text += self.decoder.push(token_id)
        if not self.stops:
            return False, 0
        # The earliest occurrence of any stop, not the first stop in list order: a token may
        # complete several at once ("xabc" with stops "bc" and "a" must give "x").
        found = [self.text.find(stop, max(0, before - len(stop) + 1)) for stop in self.stops]
        found = [index for index in found if index != -1]
        if found:
            self.text = self.text[: min(found)]
            return True, 0
        return False, partial_stop(self.text, self.stops)

    def decode_all(self, generated: list[int]) -> str:
        """`generated` in one decode, in the context of the prompt's last tokens (for
        sequences whose text nobody reads before the end: faster than pushing each)."""
        context = self.prompt_ids[-4:]
        decode = self.decoder.tokenizer.decode
        prefix, full = decode(context), decode(context + generated)
        if full.startswith(prefix) and not prefix.endswith("\ufffd"):
            self.text = full[len(prefix) :]
        else:
            self.text = "".join(self.decoder.push(t) for t in generated)
        return self.text


def partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could begin a stop sequence."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
