"""Prompts -> text, through the engine: streaming for one prompt, batched for many."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from lm.checkpoint import Checkpoint
from lm.engine import Engine, Output
from lm.errors import LMError
from lm.sampling import SamplingParams


@dataclass
class Completion:
    prompt_index: int
    text: str
    finish_reason: str
    token_ids: list[int]
    logprobs: list[float] | None
    prompt_tokens: int


def encode_prompt(checkpoint: Checkpoint, prompt: str) -> list[int]:
    """Token ids of the prompt; an empty prompt starts from a newline (or token 0)."""
    ids = checkpoint.tokenizer.encode(prompt) if prompt else []
    if not ids:
        ids = checkpoint.tokenizer.encode("\n") or [0]
    return ids


class Generator:
    """Generation for the CLI and scripts, on the same engine the server runs."""

    def __init__(self, checkpoint: Checkpoint, max_batch: int = 64):
        self.checkpoint = checkpoint
        self.engine = Engine(
            checkpoint.model, checkpoint.tokenizer, max_batch=max_batch, max_queue=1 << 20
        )

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        """Text pieces as they are made (never splitting a character)."""
        pieces: list[Output] = []
        seq = self.engine.submit(
            encode_prompt(self.checkpoint, prompt), params, pieces.append, stream=True
        )
        try:
            while not seq.finished:
                self.engine.step()
                while pieces:
                    out = pieces.pop(0)
                    if out.text:
                        yield out.text
                    if out.error is not None:
                        raise LMError(out.error.message)
        finally:
            seq.cancel()
            self.engine.run_until_idle()

    def complete(self, prompts: list[str], params: SamplingParams, n: int = 1) -> list[Completion]:
        """`n` samples for each prompt, all batched together; seeds differ per sample."""
        if n < 1:
            raise LMError(f"n must be at least 1, got {n}")
        jobs = []
        for index, prompt in enumerate(prompts):
            ids = encode_prompt(self.checkpoint, prompt)
            for sample_index in range(n):
                seed = None if params.seed is None else params.seed + sample_index
                sample_params = SamplingParams(**{**params.__dict__, "seed": seed})
                jobs.append((index, ids, self.engine.submit(ids, sample_params)))
        self.engine.run_until_idle()
        for _, _, seq in jobs:
            if seq.error is not None:
                raise LMError(seq.error.message)
        results = []
        for index, ids, seq in jobs:
            results.append(
                Completion(
                    prompt_index=index,
                    text="".join(o.text for o in seq.outputs),
                    finish_reason=seq.finish_reason or "length",
                    token_ids=seq.generated,
                    logprobs=seq.logprobs if params.logprobs is not None else None,
                    prompt_tokens=len(ids),
                )
            )
        return results
