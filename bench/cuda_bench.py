"""lm on a CUDA GPU: engine and `lm serve` throughput, float32 and bfloat16, with and
without CUDA graphs, and what bfloat16 costs in validation loss.

- quality: the validation loss of the shipped GPTs on the GPU in float32 and bfloat16
  (`lm eval --device cuda --dtype ...`).
- step: one bare decode step of the default model (rows at different positions), eager
  `GPT.step` against a replayed CUDA graph (`lm.cuda_graphs`), milliseconds.
- engine: the continuous-batching engine alone, B requests of `--new-tokens` sampled
  tokens each from prompts of different lengths (inside the context), generated tokens/s
  of the second of two runs (the first records the graphs), for the default model
  (shakespeare-char-gpt, 6x192) and the reference GPT (4x128, random weights).
- serve: `lm serve --device cuda` driven by aiohttp clients (bench.serve_bench), 1 and 64
  clients, streaming and not, with the defaults (float32, graphs), without graphs, and in
  bfloat16.

    python -m bench.cuda_bench [--out bench/results/cuda.json]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch

from bench.common import ROOT, corpus_path, reference_gpt, save_result
from bench.serve_bench import free_port, rss_mb, run_level, start_server

PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"


def quality() -> list[dict]:
    from lm.evaluate import evaluate_checkpoint

    rows = []
    for name in ("shakespeare-char-gpt", "shakespeare-bpe-gpt"):
        for dtype in ("float32", "bfloat16"):
            result = evaluate_checkpoint(name, [str(corpus_path())], device="cuda", dtype=dtype)
            rows.append({"checkpoint": name, "dtype": dtype, **result})
            print(rows[-1], flush=True)
    return rows


def step_times(model: torch.nn.Module, batches: list[int]) -> list[dict]:
    """Milliseconds per decode step, eager and from a graph, rows at positions 40..103."""
    rows = []
    for batch in batches:
        for mode in ("eager", "graph"):
            rows.append({"batch": batch, "mode": mode, "ms_per_step": _step_ms(model, batch, mode)})
            print(rows[-1], flush=True)
    return rows


def _step_ms(model: torch.nn.Module, batch: int, mode: str) -> float:
    from lm.cuda_graphs import GraphedDecode

    state = model.init_state(batch, torch.device("cuda"))
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    graphs = GraphedDecode(model, state, batch)

    def step() -> None:
        if mode == "graph":
            graphs(ids)
        else:
            _, new = model.step(ids, dict(state))
            state["pos"].copy_(new["pos"])

    times = []
    with torch.inference_mode():
        for _ in range(3):
            state["pos"].copy_(40 + torch.arange(batch, device="cuda") % 64)
            step()  # warm (records the graph)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(100):
                step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / 100 * 1000)
    return min(times)


def engine_rate(model, tokenizer, batch: int, new_tokens: int, graphs: bool) -> float:
    from lm.engine import Engine
    from lm.sampling import SamplingParams

    engine = Engine(model, tokenizer, max_batch=batch, max_queue=batch, cuda_graphs=graphs)
    prompt = tokenizer.encode(PROMPT)

    def once() -> float:
        for i in range(batch):
            engine.submit(
                prompt[: len(prompt) - i % 16],
                SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i),
            )
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.run_until_idle()
        torch.cuda.synchronize()
        return batch * new_tokens / (time.perf_counter() - start)

    once()
    return once()


def engine_rows(batches: list[int], new_tokens: int) -> list[dict]:
    from lm.checkpoint import load_checkpoint
    from lm.tokenizers import CharTokenizer

    reference_tokenizer = CharTokenizer.train(corpus_path().read_text(encoding="utf-8"))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        default = load_checkpoint("shakespeare-char-gpt", "cuda", dtype)
        reference = reference_gpt(reference_tokenizer.vocab_size).to("cuda", dtype).eval()
        models = {
            "shakespeare-char-gpt (6x192)": (default.model, default.tokenizer),
            "reference GPT (4x128)": (reference, reference_tokenizer),
        }
        for name, (model, tokenizer) in models.items():
            for graphs in (False, True):
                for batch in batches:
                    rate = engine_rate(model, tokenizer, batch, new_tokens, graphs)
                    rows.append(
                        {
                            "model": name,
                            "dtype": str(dtype).removeprefix("torch."),
                            "cuda_graphs": graphs,
                            "batch": batch,
                            "tokens_per_s": rate,
                        }
                    )
                    print(rows[-1], flush=True)
    return rows


def serve_rows(new_tokens: int) -> list[dict]:
    configs = {
        "defaults (float32, CUDA graphs)": [],
        "float32, no CUDA graphs": ["--cuda-graphs", "false"],
        "bfloat16, CUDA graphs": ["--dtype", "bfloat16"],
    }
    rows = []
    for name, extra in configs.items():
        port = free_port()
        server = start_server("shakespeare-char-gpt", port, ["--device", "cuda", *extra])
        try:
            # Warm with the first timed level's own shape: a first-in-process use of a
            # kernel (loading, PTX JIT) otherwise lands inside the 1-client row.
            asyncio.run(run_level(port, "shakespeare-char-gpt", 1, 2, False, new_tokens))
            asyncio.run(run_level(port, "shakespeare-char-gpt", 64, 1, True, 16))
            for stream in (False, True):
                for clients, per_client in ((1, 4), (64, 2)):
                    row = asyncio.run(
                        run_level(
                            port, "shakespeare-char-gpt", clients, per_client, stream, new_tokens
                        )
                    )
                    rows.append({"server": name, **row})
                    print(
                        {
                            k: round(v, 1) if isinstance(v, float) else v
                            for k, v in rows[-1].items()
                        },
                        flush=True,
                    )
            rows[-1]["rss_mb"] = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--new-tokens", type=int, default=192, help="inside the 256 context")
    parser.add_argument("--parts", default="quality,step,engine,serve")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    batches = [int(b) for b in args.batches.split(",")]
    parts = args.parts.split(",")
    result = {
        "command": "python -m bench.cuda_bench",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "new_tokens": args.new_tokens,
    }
    if "quality" in parts:
        result["quality"] = quality()
    if "step" in parts:
        from lm.checkpoint import load_checkpoint

        model = load_checkpoint("shakespeare-char-gpt", "cuda", torch.bfloat16).model
        result["step"] = step_times(model, [1, 64])
    if "engine" in parts:
        result["engine"] = engine_rows(batches, args.new_tokens)
    if "serve" in parts:
        result["serve"] = serve_rows(args.new_tokens)
    path = save_result("cuda", result)
    if args.out:
        Path(args.out).write_text(path.read_text())
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
