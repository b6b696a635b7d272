"""lm against the engines a user would pick instead, on the same weights (issue 14).

One command: exports the checkpoint with lm's own exporter (a transformers folder and a
GGUF), converts the folder to CTranslate2 (float32 and int8), builds llama.cpp's
`llama-simple`, `llama-batched-bench` and `llama-server` from the llama-cpp-python source
package (bench/llamacpp_check.py), checks that greedy outputs agree, then times

- the engines alone, interleaved round robin: lm's engine, CTranslate2 float32 and int8
  and llama.cpp (`llama-batched-bench`, f32) at batch 1, 8 and 64, generated tokens/s
  including prefill, a short prompt plus enough new tokens to fill the model's context;
  each engine with 1 and 2 threads, the best reported (CTranslate2 at batch 1: 1 thread);
- HTTP, interleaved: `lm serve` against `llama-server` on the same GGUF, 1 and 64
  concurrent aiohttp clients (as vLLM's benchmark_serving), streaming and not, greedy,
  the same prompts and max_tokens (fixed lengths: lm's models have no end token,
  llama-server is sent `ignore_eos`); tokens/s and mean time to first token.

Results go to bench/results/peers.json; `python -m bench.report` renders the Peers section.
Exports and conversions are cached under ~/.cache/lm/peers/<weights hash>/.

    python -m bench.peers [--checkpoint shakespeare-char-gpt] [--checkpoint reference]
                          [--rounds 3] [--batches 1,8,64] [--clients 1,64]
                          [--peer-clients 1] [--quick]

`--peer-clients 1` drives llama-server at one client only and `lm serve` at every level:
llama-server has stopped answering at 64 clients on these 2-core machines in every session
that tried (no CPU use, no answer).

`reference` is the small reference GPT of the other benchmarks (4x128 char, block 256,
random weights from seed 0). Needs `pip install "lm[bench]"` (CTranslate2, aiohttp).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

from bench.common import corpus_path, environment, save_result
from bench.peers_engines import time_engines
from bench.peers_formats import (
    REFERENCE,
    Exports,
    build_llama_cpp,
    checkpoint_dir,
    ct2_generate,
    ct2_generator,
    ct2_vocabulary,
    export_all,
    weights_hash,
)
from bench.peers_http import time_http

AGREEMENT_PROMPTS = ["ROMEO:\n", "First Citizen:\nBefore we proceed", "KING RICHARD III:"]
PROMPT_TOKENS = 16  # timing and HTTP prompts: corpus windows of this many tokens
HTTP_MARGIN_TOKENS = 16  # HTTP answers end this many tokens before the context is full


# -- prompts --------------------------------------------------------------------------------


def corpus_prompts(count: int, length: int = PROMPT_TOKENS) -> list[str]:
    """`count` different windows of `length` characters spread over the reference corpus."""
    text = corpus_path().read_text(encoding="utf-8")
    stride = (len(text) - length) // count
    return [text[i * stride : i * stride + length] for i in range(count)]


# -- greedy agreement -----------------------------------------------------------------------


def lm_greedy(ckpt, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """lm's greedy continuation through its engine in float32 (KV cache and products, as
    the exports; timed, the engine runs its defaults)."""
    from lm.engine import Engine
    from lm.native import decode
    from lm.sampling import SamplingParams

    with environment("LM_BF16_DECODE", "0", decode.bf16_decode):
        engine = Engine(ckpt.model, ckpt.tokenizer, max_batch=1, kv_cache_dtype="float32")
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
        seq = engine.submit(prompt_ids, params)
        engine.run_until_idle()
    return list(seq.generated)


def hf_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation (`generate`, no sampling)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def llamacpp_greedy(binary: Path, gguf: Path, tokenizer, prompt: str, new_tokens: int) -> list:
    """llama.cpp's greedy continuation (llama-simple), as ids (char vocabularies)."""
    from bench.llamacpp_check import llamacpp_greedy as run
    from bench.llamacpp_check import llamacpp_ids

    return llamacpp_ids(tokenizer, run(binary, gguf, prompt, new_tokens))


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    """The first position where two continuations differ (None: equal)."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def agreement(ckpt, exports: Exports, binaries: dict[str, Path], new_tokens: int) -> list[dict]:
    """Greedy continuations of every peer against lm's, per prompt: where they first
    differ, and how close to a tie (lm's logits) each token that is not lm's argmax is."""
    from transformers import AutoModelForCausalLM

    from bench.llamacpp_check import near_ties_ids

    hf_model = AutoModelForCausalLM.from_pretrained(str(exports.hf)).eval()
    generators = {
        f"CTranslate2 {kind}": (ct2_generator(path, kind, 1), ct2_vocabulary(path))
        for kind, path in exports.ct2.items()
    }
    rows = []
    for prompt in AGREEMENT_PROMPTS:
        prompt_ids = ckpt.tokenizer.encode(prompt)
        n = min(new_tokens, ckpt.config.block_size - len(prompt_ids))
        ours = lm_greedy(ckpt, prompt_ids, n)
        peers = {"transformers": hf_greedy(hf_model, prompt_ids, n)}
        for name, (generator, vocabulary) in generators.items():
            peers[name] = ct2_generate(generator, vocabulary, [prompt_ids], n)[0]
        if ckpt.tokenizer.kind == "char":  # llama-simple takes text; exact ids for char only
            peers["llama.cpp"] = llamacpp_greedy(
                binaries["llama-simple"], exports.gguf, ckpt.tokenizer, prompt, n
            )
        for name, theirs in peers.items():
            gaps = near_ties_ids(ckpt, prompt_ids, theirs) if theirs else []
            diff = first_difference(ours, theirs)
            rows.append(
                {
                    "prompt": prompt,
                    "peer": name,
                    "tokens": n,
                    "same": diff is None,
                    "first_difference": diff,
                    "off_argmax": len(gaps),
                    "worst_gap": max(gaps, default=0.0),
                    "lm": ckpt.tokenizer.decode(ours),
                    "theirs": ckpt.tokenizer.decode(theirs),
                }
            )
    return rows


def print_agreement(rows: list[dict], tie: float) -> int:
    """Print each comparison; return how many are not lm's greedy path up to `tie` logits
    (CTranslate2 int8 is reported, never counted: quantized weights move the logits)."""
    failures = 0
    for row in rows:
        tolerated = row["worst_gap"] <= tie or row["peer"] == "CTranslate2 int8"
        failures += not tolerated
        where = "" if row["same"] else f", first differs at token {row['first_difference']}"
        print(
            f"  {row['peer']:19} {'SAME' if row['same'] else 'DIFFERENT'}{where}; "
            f"{row['off_argmax']} tokens off lm's argmax, within {row['worst_gap']:.4f}, "
            f"prompt={row['prompt']!r}"
        )
        if not row["same"]:
            print(f"    lm:    {row['lm']!r}\n    theirs: {row['theirs']!r}")
    return failures


# -- summaries --------------------------------------------------------------------------


def summarize(samples: list[dict], keys: tuple[str, ...], group: str) -> list[dict]:
    """Median and range over rounds of each (keys..., variant); per `keys`, the best
    variant by median."""
    by_cell: dict[tuple, list[float]] = {}
    for s in samples:
        by_cell.setdefault((*[s[k] for k in keys], s[group]), []).append(s["tokens_per_s"])
    best: dict[tuple, dict] = {}
    for (*key, variant), rates in by_cell.items():
        row = {
            **dict(zip(keys, key)),
            group: variant,
            "median": statistics.median(rates),
            "min": min(rates),
            "max": max(rates),
            "rounds": len(rates),
        }
        if tuple(key) not in best or row["median"] > best[tuple(key)]["median"]:
            best[tuple(key)] = row
    return list(best.values())


def ratios(table: list[dict], engine_key: str, by: tuple[str, ...]) -> list[dict]:
    """lm's median over the best peer's, per `by` (lm is the engine whose name starts "lm")."""
    groups: dict[tuple, dict[str, float]] = {}
    for row in table:
        groups.setdefault(tuple(row[k] for k in by), {})[row[engine_key]] = row["median"]
    out = []
    for key, medians in groups.items():
        ours = {name: v for name, v in medians.items() if name.startswith("lm")}
        theirs = {name: v for name, v in medians.items() if not name.startswith("lm")}
        if ours and theirs:
            best_peer = max(theirs, key=theirs.get)
            out.append(
                {
                    **dict(zip(by, key)),
                    "best_peer": best_peer,
                    "ratio": max(ours.values()) / theirs[best_peer],
                }
            )
    return out


def http_table(samples: list[dict]) -> list[dict]:
    """Per server, clients and streaming: median tokens/s over rounds, range, mean TTFT."""
    table = summarize(
        [{**s, "variant": ""} for s in samples], ("server", "clients", "stream"), "variant"
    )
    for row in table:
        mine = [
            s
            for s in samples
            if (s["server"], s["clients"], s["stream"])
            == (row["server"], row["clients"], row["stream"])
        ]
        ttft = [s["mean_ttft_ms"] for s in mine if s["mean_ttft_ms"] is not None]
        row["mean_ttft_ms"] = statistics.median(ttft) if ttft else None
        row["failed"] = sum(s["failed"] for s in mine)
        row["short"] = sum(s["short"] for s in mine)
        del row["variant"]
    return table


# -- the whole comparison -------------------------------------------------------------------


def compare(name: str, binaries: dict[str, Path], args) -> dict:
    """Export, check agreement, time engines and HTTP for one checkpoint."""
    import torch

    from lm.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    directory = checkpoint_dir(name)
    ckpt = load_checkpoint(directory)
    exports = export_all(directory)
    config = ckpt.config
    print(
        f"{name}: {config.n_layer}x{config.n_embd}, block {config.block_size}; {exports.hf.parent}"
    )
    new_tokens = args.new_tokens or config.block_size - PROMPT_TOKENS
    rows = agreement(ckpt, exports, binaries, new_tokens)
    failures = print_agreement(rows, args.tie)
    if failures and not args.keep_going:
        raise SystemExit(f"{failures} continuations leave lm's greedy path; not timing")
    threads = [t for t in (1, 2) if t <= (os.cpu_count() or 1)]
    batches = [int(b) for b in args.batches.split(",")]
    prompts = [ckpt.tokenizer.encode(p)[:PROMPT_TOKENS] for p in corpus_prompts(max(batches))]
    samples = time_engines(
        exports, binaries, prompts, new_tokens, batches, threads, args.rounds, args.repeats
    )
    engines = summarize(samples, ("engine", "batch"), "variant")
    clients = [int(c) for c in args.clients.split(",") if c]
    http = (
        time_http(
            exports,
            binaries,
            corpus_prompts(max(clients) * args.requests_per_client),
            config.block_size,
            clients,
            args.rounds,
            args.requests_per_client,
            # llama-server stops a slot one token before its context is full; a margin, as
            # one run with 64 slots filled to the last token hung.
            new_tokens - HTTP_MARGIN_TOKENS,
            max(threads),
            None
            if args.peer_clients is None
            else [int(c) for c in args.peer_clients.split(",") if c],
        )
        if clients
        else []
    )
    http_rows = http_table(http) if http else []
    return {
        "checkpoint": name,
        "shape": f"{config.n_layer}x{config.n_embd}, {config.n_head} heads",
        "params": ckpt.model.num_params(),
        "block_size": config.block_size,
        "weights_hash": weights_hash(directory),
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": new_tokens,
        "agreement": rows,
        "agreement_failures": failures,
        "engine_samples": samples,
        "engines": engines,
        "engine_ratios": ratios(engines, "engine", ("batch",)),
        "http_samples": http,
        "http": http_rows,
        "http_ratios": ratios(http_rows, "server", ("clients", "stream")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        help=f"repeatable: a shipped name, a path or {REFERENCE!r} (default: shakespeare-char-gpt)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="round-robin passes over all cells")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell and round")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--clients", default="1,64", help="HTTP levels ('' skips HTTP)")
    parser.add_argument(
        "--peer-clients",
        default=None,
        help="HTTP levels at which llama-server runs too (default: all; on these 2-core "
        "machines it has stopped answering at 64 clients in every session since 6)",
    )
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument(
        "--new-tokens", type=int, default=0, help="default: fill the context after the prompt"
    )
    parser.add_argument(
        "--tie",
        type=float,
        default=0.01,
        help="logit gap under which a peer may take another token than lm's argmax",
    )
    parser.add_argument("--keep-going", action="store_true", help="time even if outputs differ")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round, 1 repeat, 8 new tokens, 1 request: a smoke run",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.repeats, args.new_tokens, args.requests_per_client = 1, 1, 8, 1
    binaries = build_llama_cpp()
    models = [compare(name, binaries, args) for name in args.checkpoint or ["shakespeare-char-gpt"]]
    if args.quick:
        print(json.dumps(models, indent=1, default=str)[-6000:])
        print("quick run: bench/results/peers.json left as it was")
        return
    command = "python -m bench.peers " + shlex.join(sys.argv[1:])
    path = save_result(
        "peers",
        {
            "command": command.strip(),
            "rounds": args.rounds,
            "repeats": args.repeats,
            "cpu_count": os.cpu_count(),
            "models": models,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
