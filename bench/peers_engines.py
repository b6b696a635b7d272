"""Time lm's engine, CTranslate2 and llama.cpp alone, round robin (bench/peers.py).

Generated tokens/s including prefill, greedy, fixed lengths. lm and CTranslate2 run each
cell in a fresh Python process (`python -m bench.peers_engines --measure JSON`: OpenMP and
allocator state are per process); llama.cpp is `llama-batched-bench`, whose table is parsed.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT
from bench.peers_formats import CT2_TYPES, Exports, ct2_generate, ct2_generator, ct2_vocabulary


def time_lm(
    checkpoint: Path,
    batch: int,
    threads: int,
    prompts: list[list[int]],
    new_tokens: int,
    repeats: int,
) -> list[float]:
    """lm's engine, greedy, `batch` sequences at once: generated tokens/s of each repeat
    after one warm-up (prefill included)."""
    import torch

    from lm.checkpoint import load_checkpoint
    from lm.engine import Engine
    from lm.sampling import SamplingParams

    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)

    def once() -> float:
        engine = Engine(
            ckpt.model, ckpt.tokenizer, max_batch=batch, max_queue=batch, threads=threads
        )
        start = time.perf_counter()
        seqs = [
            engine.submit(prompts[i], SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
            for i in range(batch)
        ]
        engine.run_until_idle()
        elapsed = time.perf_counter() - start
        _check_lengths("lm", [len(seq.generated) for seq in seqs], new_tokens)
        return batch * new_tokens / elapsed

    once()
    return [once() for _ in range(repeats)]


def time_ct2(
    path: Path,
    compute_type: str,
    batch: int,
    threads: int,
    prompts: list[list[int]],
    new_tokens: int,
    repeats: int,
) -> list[float]:
    """CTranslate2's `generate_batch`, greedy: generated tokens/s of each repeat after one
    warm-up (prefill included)."""
    generator = ct2_generator(path, compute_type, threads)
    vocabulary = ct2_vocabulary(path)

    def once() -> float:
        start = time.perf_counter()
        out = ct2_generate(generator, vocabulary, prompts[:batch], new_tokens)
        elapsed = time.perf_counter() - start
        _check_lengths("CTranslate2", [len(ids) for ids in out], new_tokens)
        return batch * new_tokens / elapsed

    once()
    return [once() for _ in range(repeats)]


def _check_lengths(engine: str, lengths: list[int], new_tokens: int) -> None:
    if any(n != new_tokens for n in lengths):
        raise SystemExit(f"{engine} made {sorted(set(lengths))} tokens, not {new_tokens}")


def time_llamacpp(
    binary: Path, gguf: Path, batch: int, threads: int, prompt_tokens: int, new_tokens: int
) -> list[float]:
    """llama.cpp (llama-batched-bench, prompts not shared): generated tokens/s including
    prefill, B*TG / T (it feeds tokens without sampling). A run that prints no table is
    tried once more."""
    command = [
        str(binary),
        "-m",
        str(gguf),
        "-c",  # with a margin: at exactly B * (PP + TG) a run sometimes printed no row
        str(batch * (prompt_tokens + new_tokens) + 256),
        "-npp",
        str(prompt_tokens),
        "-ntg",
        str(new_tokens),
        "-npl",
        str(batch),
        "-t",
        str(threads),
        "-tb",
        str(threads),
    ]
    for _ in range(2):
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        rows = parse_batched_bench(run.stdout + run.stderr)
        if rows and not run.returncode:
            return generated_rates(rows)
    output = (run.stdout + run.stderr)[-3000:]
    raise SystemExit(f"llama-batched-bench failed twice (exit {run.returncode}):\n{output}")


def generated_rates(rows: list[dict]) -> list[float]:
    """Generated tokens/s including prefill of llama-batched-bench's rows: B*TG / T (its
    own S column also counts the prompt tokens)."""
    return [row["B"] * row["TG"] / row["T s"] for row in rows]


def parse_batched_bench(text: str) -> list[dict]:
    """The rows of llama-batched-bench's markdown table, by column name (PP, TG, B, N_KV,
    T_PP s, S_PP t/s, T_TG s, S_TG t/s, T s, S t/s)."""
    columns: list[str] = []
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) < 2:
            continue
        if cells[0] == "PP":
            columns = cells
        elif columns and re.fullmatch(r"-?\d+", cells[0]) and len(cells) == len(columns):
            rows.append({name: _number(cell) for name, cell in zip(columns, cells)})
    return rows


def _number(cell: str) -> int | float:
    return int(cell) if re.fullmatch(r"-?\d+", cell) else float(cell)


def measure(spec: dict) -> list[float]:
    """One timing cell, in this process (the parent runs each in a fresh one)."""
    prompts = spec["prompts"]
    if spec["engine"].startswith("lm"):
        return time_lm(
            Path(spec["path"]),
            spec["batch"],
            spec["threads"],
            prompts,
            spec["new_tokens"],
            spec["repeats"],
        )
    return time_ct2(
        Path(spec["path"]),
        spec["compute_type"],
        spec["batch"],
        spec["threads"],
        prompts,
        spec["new_tokens"],
        spec["repeats"],
    )


def engine_cells(exports: Exports, batches: list[int], threads: list[int]) -> list[dict]:
    """Every (engine, variant, batch) to time: each engine with each thread count, except
    CTranslate2 at batch 1 (1 thread: 2 threads is several times slower there). lm runs
    its defaults, and where those multiply in bfloat16 (`lm.native.decode.bf16_decode`)
    also in float32 (`LM_BF16_DECODE=0`), as "lm float32"; where its build multiplies
    int8 (`i8_weights`), also with int8 products, as "lm int8" (CTranslate2 int8's scheme)."""
    from lm.native.decode import bf16_decode, i8_weights

    lms = [("lm", {})] + ([("lm float32", {"LM_BF16_DECODE": "0"})] if bf16_decode() else [])
    lms += [("lm int8", {"LM_DECODE_MATRICES": "int8"})] if i8_weights() else []
    cells = []
    for batch in batches:
        for name, env in lms:
            for t in threads:
                cells.append(
                    {"engine": name, "variant": f"{t} threads", "batch": batch, "threads": t}
                    | ({"env": env} if env else {})
                )
        for kind in CT2_TYPES:
            for t in [1] if batch == 1 else threads:
                cells.append(
                    {
                        "engine": f"CTranslate2 {kind}",
                        "variant": f"{t} threads",
                        "batch": batch,
                        "threads": t,
                        "compute_type": kind,
                        "path": str(exports.ct2[kind]),
                    }
                )
        for t in threads:
            cells.append(
                {"engine": "llama.cpp f32", "variant": f"{t} threads", "batch": batch, "threads": t}
            )
    return cells


def run_cell(cell: dict, exports: Exports, binaries, prompts, new_tokens, repeats) -> list[float]:
    """Time one cell: llama.cpp directly, lm and CTranslate2 in a fresh Python process."""
    if cell["engine"].startswith("llama.cpp"):
        return time_llamacpp(
            binaries["llama-batched-bench"],
            exports.gguf,
            cell["batch"],
            cell["threads"],
            len(prompts[0]),
            new_tokens,
        )
    spec = {
        "path": str(exports.checkpoint),
        **cell,
        "prompts": prompts[: cell["batch"]],
        "new_tokens": new_tokens,
        "repeats": repeats,
    }
    out = subprocess.run(
        [sys.executable, "-m", "bench.peers_engines", "--measure", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, **cell.get("env", {})},
    )
    if out.returncode:
        raise SystemExit(f"{cell['engine']} timing failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_engines(
    exports: Exports,
    binaries: dict[str, Path],
    prompts: list[list[int]],
    new_tokens: int,
    batches: list[int],
    threads: list[int],
    rounds: int,
    repeats: int,
) -> list[dict]:
    """Every cell once per round, round robin: one sample per cell and round."""
    cells = engine_cells(exports, batches, threads)
    samples = []
    for round_index in range(rounds):
        for cell in cells:
            rates = run_cell(cell, exports, binaries, prompts, new_tokens, repeats)
            sample = {
                "engine": cell["engine"],
                "variant": cell["variant"],
                "batch": cell["batch"],
                "round": round_index,
                "tokens_per_s": statistics.median(rates),
            }
            print(f"  round {round_index + 1}/{rounds}: {brief(sample)}", flush=True)
            samples.append(sample)
    return samples


def brief(row: dict) -> str:
    """A sample as one printable line."""
    return ", ".join(
        f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in row.items()
        if k != "round"
    )


def main() -> None:
    print(json.dumps(measure(json.loads(sys.argv[sys.argv.index("--measure") + 1]))))


if __name__ == "__main__":
    main()
