"""The served models: loading checkpoints for a server and starting one engine for each.

`lm serve` and the app's start-up both come through here, so they cannot load differently.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field

from lm import lora
from lm.chat import ChatTemplate, load_chat_template
from lm.checkpoint import Checkpoint, load_checkpoint
from lm.device import pick_device, pick_dtype, serving_threads
from lm.engine import Engine, Output, Sequence, merge_outputs
from lm.errors import LMError
from service.settings import Settings


@dataclass
class ServedModel:
    name: str
    checkpoint: Checkpoint
    engine: Engine
    created: int
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)
    adapter: int = 0  # a LoRA adapter of the checkpoint's model (1-based), served in its batches
    parent: str | None = None  # the base's name, for an adapter


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    """`NAME=DIR` pairs from the `adapters` setting."""
    pairs = []
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name.strip() or not directory.strip():
            raise LMError(f"--adapter {spec!r}: expected NAME=DIR", param="adapters")
        pairs.append((name.strip(), directory.strip()))
    return pairs


def attach_adapters(checkpoints: list[Checkpoint], specs: list[str]) -> None:
    """Load each `NAME=DIR` adapter and give it to the served checkpoint it was trained
    on (by weights hash), in the order given; an adapter of no served base, or one whose
    matrices do not fit, is an LMError naming it."""
    pairs = parse_adapters(specs)
    if not pairs:
        return
    names = [c.name for c in checkpoints] + [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise LMError(f"an adapter shares a name with another model: {names}", param="adapters")
    hashes = {lora.weights_hash(c.path): c for c in checkpoints}
    per_base: dict[str, list] = {}
    for name, directory in pairs:
        adapter = lora.load_adapter(directory)
        base = hashes.get(adapter.meta["base"].get("weights_hash"))
        if base is None:
            raise LMError(
                f"--adapter {name}={directory}: trained on "
                f"{adapter.meta['base'].get('name')!r} "
                f"({adapter.meta['base'].get('weights_hash')}), which is not served "
                f"(served: {', '.join(c.name for c in checkpoints)})",
                param="adapters",
            )
        per_base.setdefault(base.name, []).append((name, adapter))
    for ckpt in checkpoints:
        chosen = per_base.get(ckpt.name, [])
        lora.attach_adapters(ckpt.model, [adapter for _, adapter in chosen])
        ckpt.meta["adapters"] = [name for name, _ in chosen]


def load_checkpoints(settings: Settings) -> list[Checkpoint]:
    """The checkpoints `settings` names, on its device; two may not share a name."""
    # Before any tensor work here: the engines' threads run the models (see serving_threads).
    serving_threads(settings.torch_threads)
    device = pick_device(settings.device)
    checkpoints = [load_checkpoint(name, device) for name in settings.checkpoints]
    check_names(checkpoints)
    attach_adapters(checkpoints, settings.adapters)
    dtype = pick_dtype(device, settings.dtype)
    for ckpt in checkpoints:  # after the adapters, so that they are cast too
        ckpt.model.to(dtype)
    return checkpoints


# Streamed chunks per second in all when a model runs on the CPU (--stream-chunk-rate):
# on 2 cores, 64 streaming clients get 1.25x the tokens/s of a chunk per token, chunks
# 43 ms apart; one stream's gaps stay those of its engine steps (bench.stream_bench).
CPU_CHUNK_RATE = 1500.0


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

    chunk_rate = settings.stream_chunk_rate
    if chunk_rate is None:  # the engines share the CPU with the event loop: pace chunks
        on_cpu = any(next(c.model.parameters()).device.type == "cpu" for c in checkpoints)
        chunk_rate = CPU_CHUNK_RATE if on_cpu else 0.0
    notify = Mailbox(loop, settings.stream_flush_ms / 1000, chunk_rate).post

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
            decode_matrices=settings.decode_matrices,
            prefix_cache_mb=settings.prefix_cache_mb,
            cuda_graphs=settings.cuda_graphs,
        )
        engine.start()
        template = load_chat_template(ckpt.path, ckpt.meta)
        served[ckpt.name] = ServedModel(ckpt.name, ckpt, engine, int(time.time()), template)
        for index, name in enumerate(ckpt.meta.get("adapters", []), 1):
            served[name] = ServedModel(
                name, ckpt, engine, int(time.time()), template, adapter=index, parent=ckpt.name
            )
    return served


class Mailbox:
    """The engines' outputs on their way to the event loop.

    Every token a stream sends costs the event loop the same (an event, a JSON chunk, a
    write), and on a small machine the loop shares the cores with the engine: at 64
    streaming clients a delivery per step costs the engine much of its speed. So the loop
    is woken at most once per `interval` seconds, and outputs that arrive in between go
    with the next delivery (a stream then sends them as one event, service/jobs.py). A
    sequence's first output (its time to first token) is delivered at once, and with it
    everything waiting. With `interval` 0, every post wakes the loop unless a wake-up is
    already on its way (when the loop falls behind, it still takes several steps at once).

    `chunk_rate` (chunks per second, 0: no limit) paces by load instead: a post of outputs
    for n sequences (n streams' tokens of one step) waits at least n / chunk_rate seconds
    after the last delivery, so one stream gets its tokens almost at once and 64 streams
    get theirs in fewer, larger chunks (a finished request's answer waits as long)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, interval: float = 0.0, chunk_rate: float = 0.0
    ):
        self.loop = loop
        self.interval = interval
        self.chunk_rate = chunk_rate
        self.lock = threading.Lock()
        self.events: list[tuple[Sequence, Output]] = []
        self.due: float | None = None  # when the delivery on its way runs (monotonic clock)
        self.last = -math.inf  # when the last delivery ran

    def post(self, events: list[tuple[Sequence, Output]]) -> None:
        now = time.monotonic()
        urgent = any(out.first for _, out in events)
        with self.lock:
            self.events.extend(events)
            wait = self.interval
            if self.chunk_rate:
                streams = len({seq for seq, _ in events})  # a lone run posts many
                wait = max(wait, streams / self.chunk_rate)
            due = now if urgent else max(now, self.last + wait)
            if self.due is not None and self.due <= due:
                return  # a delivery at least as early is on its way
            self.due = due
        try:
            if due <= now:
                self.loop.call_soon_threadsafe(self.deliver, due)
            else:
                self.loop.call_soon_threadsafe(self.loop.call_later, due - now, self.deliver, due)
        except RuntimeError:  # the loop is closed: nothing will take these
            with self.lock:
                self.events.clear()
                self.due = None
            raise

    def deliver(self, due: float | None = None) -> None:
        with self.lock:
            if due is not None and due != self.due:
                return  # overtaken by an earlier delivery, which took its outputs
            self.due = None
            events, self.events = self.events, []
            if events:
                self.last = time.monotonic()
        # One output per sequence: the steps a stream's tokens came in since the last
        # delivery cost its request one event, not one each.
        parts: dict[Sequence, list[Output]] = {}
        for seq, out in events:
            parts.setdefault(seq, []).append(out)
        for seq, outs in parts.items():
            seq.sink(merge_outputs(outs))
