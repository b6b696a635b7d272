"""The served models: loading checkpoints for a server and starting one engine for each.

`lm serve` and the app's start-up both come through here, so they cannot load differently.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from lm.checkpoint import Checkpoint, load_checkpoint
from lm.device import pick_device, serving_threads
from lm.engine import Engine, Output, Sequence
from lm.errors import LMError
from service.settings import Settings


@dataclass
class ServedModel:
    name: str
    checkpoint: Checkpoint
    engine: Engine
    created: int


def load_checkpoints(settings: Settings) -> list[Checkpoint]:
    """The checkpoints `settings` names, on its device; two may not share a name."""
    # Before any tensor work here: the engines' threads run the models (see serving_threads).
    serving_threads(settings.torch_threads)
    device = pick_device(settings.device)
    checkpoints = [load_checkpoint(name, device) for name in settings.checkpoints]
    check_names(checkpoints)
    return checkpoints


def check_names(checkpoints: list[Checkpoint]) -> None:
    names = [c.name for c in checkpoints]
    if len(set(names)) != len(names):
        raise LMError(f"two checkpoints share a name: {names}", param="checkpoints")


def start_engines(
    checkpoints: list[Checkpoint], settings: Settings, loop: asyncio.AbstractEventLoop
) -> dict[str, ServedModel]:
    """One running engine per checkpoint; each hands its step's outputs to `loop` at once."""
    check_names(checkpoints)
    threads = serving_threads(settings.torch_threads)

    def notify(events: list[tuple[Sequence, Output]]) -> None:
        loop.call_soon_threadsafe(_dispatch, events)

    served = {}
    for ckpt in checkpoints:
        is_gpt = getattr(ckpt.model, "context_size", None) is not None
        engine = Engine(
            ckpt.model,
            ckpt.tokenizer,
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            notify=notify,
            threads=threads,
            stream_interval=settings.stream_interval,
            kv_cache_dtype=settings.kv_cache_dtype if is_gpt else "auto",
        )
        engine.start()
        served[ckpt.name] = ServedModel(ckpt.name, ckpt, engine, int(time.time()))
    return served


def _dispatch(events: list[tuple[Sequence, Output]]) -> None:
    for seq, out in events:
        seq.sink(out)
