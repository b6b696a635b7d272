"""Build docs/BENCHMARKS.md from the JSON results the benchmarks wrote in bench/results/.

python -m bench.report
"""

from __future__ import annotations

import json

from bench.common import RESULTS, ROOT

OUT = ROOT / "docs" / "BENCHMARKS.md"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def header(result: dict) -> list[str]:
    return [
        f"Command: `{result['command']}`  ",
        f"Run: {result['date']} on {result['machine']}, revision {result['revision']}.",
        "",
    ]


def train_section(r: dict) -> list[str]:
    rows = r["rows"]
    lines = ["## Training", ""] + header(r)
    lines += [
        "Char GPT, 4 layers, 4 heads, 128 wide, block 64, batch 12, on Tiny Shakespeare; "
        "validation loss on the whole held-out 10% (nanoGPT reaches 1.886 with this recipe "
        "in 80 s on these machines, per DESIGN.md).",
        "",
        "| run | steps | training s | tokens/s | val loss |",
        "|---|---|---|---|---|",
    ]
    names = {
        "plain_pytorch": "plain PyTorch loop (same dims, batches, schedule)",
        "lm_same_recipe": "`lm train`, same recipe",
        "lm_tuned_same_time": "`lm train`, tuned recipe, plain loop's wall-clock",
    }
    for key, label in names.items():
        row = rows[key]
        seconds = row.get("train_seconds", row["seconds"])
        lines.append(
            f"| {label} | {fmt(row.get('steps', r['reference']['max_steps']))} | "
            f"{fmt(seconds, 1)} | {fmt(row['tokens_per_s'])} | {fmt(row['val_loss'], 4)} |"
        )
    lines += [
        "",
        f"Throughput of `lm train` / plain loop: **{r['throughput_ratio_lm_vs_plain']:.2f}x**.",
        "",
    ]
    tuned = rows["lm_tuned_same_time"].get("recipe", {})
    if tuned:
        lines += [
            f"Tuned recipe: lr {tuned['lr']}, batch {tuned['batch_size']}, warm-up "
            f"{tuned['warmup_steps']}, {tuned['max_steps']} steps.",
            "",
        ]
    if r.get("kinds"):
        lines += [
            "### One row per model kind (same time budget, about the same size)",
            "",
            "| model | parameters | steps | tokens/s | val loss | bits/char |",
            "|---|---|---|---|---|---|",
        ]
        for kind, row in r["kinds"].items():
            s = row["settings"]
            shape = f"{s['n_layer']}x{s['n_embd']}" + (
                f", {s['n_head']} heads" if kind == "gpt" else ""
            )
            lines.append(
                f"| {kind} ({shape}) | {fmt(row['params'])} | {fmt(row['steps'])} | "
                f"{fmt(row['tokens_per_s'])} | {fmt(row['val_loss'], 4)} | "
                f"{fmt(row['val_bpc'], 3)} |"
            )
        lines.append("")
    return lines


def ddp_section(r: dict) -> list[str]:
    lines = ["## Training with torchrun (data parallel, gloo)", ""] + header(r)
    lines += [
        "Char GPT, 4 layers x 128, block 64, batch 12 per process, on Tiny Shakespeare; "
        "tokens/s counts every process's tokens.",
        "",
        "| processes | threads each | global batch | tokens/s | train loss at the end |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['processes']} | {row['threads_each']} | {row['global_batch']} | "
            f"{fmt(row['tokens_per_s'])} | {fmt(row['train_loss'], 4)} |"
        )
    return lines + [""]


def decode_section(r: dict) -> list[str]:
    lines = ["## Decoding", ""] + header(r)
    lines += [
        f"Tokens/s generated ({r['new_tokens']} new tokens per stream, sampling, "
        f"{r['threads']} threads). Reference GPT: {fmt(r['reference_params'])} parameters. "
        f"Baseline: Hugging Face `transformers` `generate` on a GPT-2 of the same "
        f"dimensions, same run (nanoGPT's own sampler, without a KV cache, makes about 430 "
        f"tok/s for one stream on these machines, per DESIGN.md; not re-measured here).",
        "",
        "| streams | lm GPT | transformers GPT-2 | lm / transformers |"
        + (f" lm {r['lstm']} |" if r.get("lstm") else ""),
        "|---|---|---|---|" + ("---|" if r.get("lstm") else ""),
    ]
    for row in r["rows"]:
        line = (
            f"| {row['streams']} | {fmt(row['lm_gpt'])} | {fmt(row.get('hf_gpt2'))} | "
            f"{fmt(row.get('ratio_vs_hf'), 2)}x |"
        )
        if r.get("lstm"):
            line += f" {fmt(row.get('lm_lstm'))} |"
        lines.append(line)
    steps = r.get("native_step") or []
    if steps:
        lines += [
            "",
            "A bare decode step of the shipped char GPT (one thread's CPU milliseconds, median "
            "of interleaved rounds; rows at positions spread over the context): the PyTorch "
            "path, the native step with float32 and with bfloat16 products over a float32 "
            "cache, and with bfloat16 products over lm serve's caches (bfloat16; int8 with a "
            "scale per head vector, `--kv-cache-dtype int8`); then int8 products over the int8 "
            "cache (`--decode-matrices int8`).",
            "",
            "| rows | PyTorch | native float32 | native bf16 products | + bf16 cache "
            "| + int8 cache | int8 cache's speed-up | int8 products, int8 cache | their "
            "speed-up |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in steps:
            speedup = row.get("int8_products_speedup")
            lines.append(
                f"| {row['streams']} | {fmt(row['pytorch_step_ms'], 3)} | "
                f"{fmt(row['native_step_ms'], 3)} | {fmt(row.get('bf16_step_ms'), 3)} | "
                f"{fmt(row.get('bf16_cache_step_ms'), 3)} | "
                f"{fmt(row.get('int8_cache_step_ms'), 3)} | "
                f"{fmt(row.get('int8_cache_speedup'), 2)}x | "
                f"{fmt(row.get('int8_products_step_ms'), 3)} | "
                f"{'-' if speedup is None else fmt(speedup, 2) + 'x'} |"
            )
    return lines + [""]


def serve_section(r: dict) -> list[str]:
    lines = ["## Serving over HTTP", ""] + header(r)
    lines += [
        "Reference GPT (4x128 char, block 256) behind `lm serve`, aiohttp clients on the "
        "same 2 cores, 256 new tokens per request. TTFT and inter-token latency (ITL) are "
        "measured at the client on streamed chunks.",
        "",
        "| clients | stream | requests | failed | tokens/s | TTFT p50 / p99 ms | "
        "ITL p50 / p99 ms | e2e p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        ttft = (
            f"{fmt(row['ttft_p50_ms'], 1)} / {fmt(row['ttft_p99_ms'], 1)}" if row["stream"] else "-"
        )
        itl = f"{fmt(row['itl_p50_ms'], 1)} / {fmt(row['itl_p99_ms'], 1)}" if row["stream"] else "-"
        lines.append(
            f"| {row['clients']} | {'yes' if row['stream'] else 'no'} | {row['requests']} | "
            f"{row['failed']} | {fmt(row['tokens_per_s'])} | {ttft} | {itl} | "
            f"{fmt(row['e2e_p50_ms'])} / {fmt(row['e2e_p99_ms'])} |"
        )
    memory = r.get("memory", {})
    labels = {
        "reference_start_mb": "reference model, at start",
        "reference_end_mb": "reference model, after the runs above",
        "default_model_after_64_streams_mb": "shipped default model, after 64 streams",
    }
    lines += [
        "",
        "Server resident memory: "
        + "; ".join(f"{labels.get(key, key)} {value:.0f} MB" for key, value in memory.items())
        + ".",
        "",
    ]
    if r.get("server_args"):
        lines += [f"Server flags: `{' '.join(r['server_args'])}`.", ""]
    lines += ["![serving throughput](serve_throughput.png)", ""]
    return lines


def locust_section(r: dict, title: str) -> list[str]:
    lines = [f"## {title}", ""] + header(r)
    lines += [
        f"`service/locustfile.py` mix (short and long prompts, streaming and not, few-shot, "
        f"models and health) against `lm serve` with `{r['checkpoint']}`; locust runs on the "
        f"same 2 cores. {r['users']} users for {r['run_time']}: **{r['requests']:,} requests, "
        f"{r['failures']} failed**, {r['rps']:.1f} requests/s. Server memory "
        f"{r['memory_start_mb']:.0f} MB at start, "
        f"{r['memory_samples'][1][1]:.0f} MB after the first {r['memory_samples'][1][0]:.0f} s "
        f"of load, {r['memory_end_mb']:.0f} MB at the end "
        f"(max {r['memory_max_mb']:.0f} MB). Health afterwards: `{r['health_after']}`.",
        "",
        "| endpoint | requests | failures | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for e in r["endpoints"]:
        lines.append(
            f"| {e['type']} {e['name']} | {e['requests']:,} | {e['failures']} | "
            f"{e['p50_ms']:.0f} | {e['p99_ms']:.0f} |"
        )
    return lines + [""]


def engine_section(r: dict) -> list[str]:
    lines = ["## The engine alone", ""] + header(r)
    lines += [
        f"{r['streams']} sequences of the reference GPT, {r['new_tokens']} new tokens "
        "each, prompts of different lengths; each configuration in a fresh process, "
        "timed on its second run.",
        "",
        "| configuration | tokens/s | resident MB |",
        "|---|---|---|",
    ]
    lines += [
        f"| {row['config']} | {fmt(row['tokens_per_s'])} | {fmt(row['rss_mb'])} |"
        for row in r["rows"]
    ]
    return lines + [""]


def cuda_section(r: dict) -> list[str]:
    lines = ["## On a GPU (CUDA)", ""] + header(r)
    lines += [
        f"{r['gpu']}, torch {r['torch']}. Engine rows: B requests of {r['new_tokens']} "
        "sampled tokens each, prompts of different lengths, inside the 256-token context, "
        "timed on the second of two runs (the first records the CUDA graphs). Serve rows: "
        "`lm serve --device cuda` with the shipped char GPT, aiohttp clients "
        "(bench.serve_bench), 1 client sending 4 requests and 64 clients sending 2 each.",
        "",
        "Validation loss on the GPU (whole validation split):",
        "",
        "| checkpoint | float32 | bfloat16 |",
        "|---|---|---|",
    ]
    by = {(q["checkpoint"], q["dtype"]): q["loss"] for q in r.get("quality", [])}
    for name in dict.fromkeys(q["checkpoint"] for q in r.get("quality", [])):
        lines.append(f"| {name} | {by[(name, 'float32')]:.5f} | {by[(name, 'bfloat16')]:.5f} |")
    if r.get("step"):
        lines += ["", "One decode step of shakespeare-char-gpt (bfloat16), ms:", ""]
        lines += ["| batch | eager | CUDA graph | ratio |", "|---|---|---|---|"]
        steps = {(s["batch"], s["mode"]): s["ms_per_step"] for s in r["step"]}
        for batch in dict.fromkeys(s["batch"] for s in r["step"]):
            eager, graph = steps[(batch, "eager")], steps[(batch, "graph")]
            lines.append(f"| {batch} | {eager:.3f} | {graph:.3f} | {eager / graph:.1f}x |")
    if r.get("engine"):
        batches = list(dict.fromkeys(e["batch"] for e in r["engine"]))
        lines += ["", "The engine, generated tokens/s:", ""]
        lines += [
            "| model | dtype | CUDA graphs | " + " | ".join(f"batch {b}" for b in batches) + " |",
            "|---|---|---|" + "---|" * len(batches),
        ]
        rates = {}
        for e in r["engine"]:
            rates.setdefault((e["model"], e["dtype"], e["cuda_graphs"]), {})[e["batch"]] = e[
                "tokens_per_s"
            ]
        for (model, dtype, graphs), row in rates.items():
            cells = " | ".join(fmt(row.get(b)) for b in batches)
            lines.append(f"| {model} | {dtype} | {'yes' if graphs else 'no'} | {cells} |")
    if r.get("serve"):
        when = f" (run {r['serve_date']} at {r['serve_revision']})" if r.get("serve_date") else ""
        lines += ["", f"`lm serve` on the GPU{when}:", ""]
        lines += [
            "| server | clients | streaming | tokens/s | TTFT p50 ms | ITL p50 ms | e2e p50 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in r["serve"]:
            lines.append(
                f"| {s['server']} | {s['clients']} | {'yes' if s['stream'] else 'no'} | "
                f"{fmt(s['tokens_per_s'])} | {fmt(s['ttft_p50_ms'], 1)} | "
                f"{fmt(s['itl_p50_ms'], 1)} | {fmt(s['e2e_p50_ms'])} |"
            )
    return lines + [""]


def precision_section(r: dict) -> list[str]:
    lines = ["## Generation precision and quality", ""] + header(r)
    lines += [
        f"Validation loss (nats per token) of decoding {r['windows']} windows of the "
        "held-out text: half a context prefilled, the rest decoded token by token "
        "through the engine's `step`.",
        "",
        "| checkpoint | configuration | loss | change |",
        "|---|---|---|---|",
    ]
    for row in r["rows"]:
        note = (
            ""
            if row["bf16_prefill_applied"] or "bfloat16 prefill" not in row["config"]
            else " (no hardware bfloat16: float32 prefill)"
        )
        lines.append(
            f"| {row['checkpoint']} | {row['config']}{note} | {row['loss']:.5f} | "
            f"{row['delta']:+.5f} |"
        )
    return lines + [""]


def fewshot_section(r: dict) -> list[str]:
    lines = ["## Few-shot accuracy", ""] + header(r)
    lines += [r.get("table", ""), "", "![accuracy vs shots](fewshot_accuracy.png)", ""]
    return lines


def prefix_section(r: dict) -> list[str]:
    lines = ["## Prefix caching", ""] + header(r)
    lines += [
        f"{r['clients']} concurrent streaming few-shot requests ({r['checkpoint']}, "
        f"{r['shots']} examples each through the API's `examples` field, greedy), whose "
        'examples are the same in every request ("shared") or differ ("distinct"); '
        "means over interleaved waves"
        + (
            f", after {r['warmup_rounds']} uncounted round(s) of each."
            if r.get("warmup_rounds")
            else "."
        ),
        "",
        "| prefix cache | examples | requests/s | mean TTFT ms | p50 TTFT ms | "
        "engine's mean TTFT ms | hit rate | resident MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        cache = f"{row['prefix_cache_mb']:.0f} MB" if row["prefix_cache_mb"] else "off"
        lines.append(
            f"| {cache} | {row['examples']} | {fmt(row['requests_per_s'], 1)} | "
            f"{fmt(row['ttft_mean_ms'])} | {fmt(row['ttft_p50_ms'])} | "
            f"{fmt(row.get('server_ttft_mean_ms'))} | {row['hit_rate']:.0%} | "
            f"{fmt(row['rss_mb'])} |"
        )
    lines += [
        "",
        "The engine's time to first token runs from the request's submission to the engine "
        "(vllm:time_to_first_token_seconds); the client's also holds the HTTP request, "
        "its parsing and the delivery of the first event.",
    ]
    ratios = r["shared_vs_distinct"]
    lines += [
        "",
        f"Shared over distinct examples, cache on: {ratios['requests_per_s']:.2f}x the "
        f"requests/s, {ratios['ttft_mean']:.2f}x lower mean time to first token.",
        "",
    ]
    return lines


def stream_section(r: dict) -> list[str]:
    lines = ["## Streaming: server variants", ""] + header(r)
    lines += [
        f"`lm serve --checkpoint {r['checkpoint']}` with each variant's arguments, one server "
        f"per variant, all up together and driven in turn; aiohttp clients, {r['tokens']} new "
        "tokens per request; medians over interleaved rounds. Gaps are between chunks at the "
        "client.",
        "",
        "| server arguments | clients | stream | tokens/s (range) | TTFT p50 ms | gap p50 ms | "
        "gap p99 ms | tokens per chunk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    # Results before variants were named: one server per flush interval.
    rows = [
        row if "variant" in row else {"variant": f"--stream-flush-ms {row['flush_ms']:g}", **row}
        for row in r["rows"]
    ]
    order = {v: i for i, v in enumerate(r.get("variants", []))}
    for row in sorted(
        rows, key=lambda x: (-x["clients"], not x["stream"], order.get(x["variant"], 0))
    ):
        low, high = row["tokens_per_s_range"]
        label = f"`{row['variant']}`" if row["variant"] else "(defaults)"
        lines.append(
            f"| {label} | {row['clients']} | {'yes' if row['stream'] else 'no'} | "
            f"{fmt(row['tokens_per_s'])} ({low:,.0f}-{high:,.0f}) | {fmt(row['ttft_p50_ms'], 1)} | "
            f"{fmt(row['itl_p50_ms'], 1)} | {fmt(row['itl_p99_ms'], 1)} | "
            f"{fmt(row['mean_tokens_per_chunk'], 1)} |"
        )
    lines.append("")
    return lines


def blocks_section(r: dict) -> list[str]:
    lines = ["## Classic and modern GPT blocks: generation speed", ""] + header(r)
    lines += [
        f"The shipped char GPT before ({r['old']}: GPT-2 blocks, context 128) and after "
        f"({r['new']}: Qwen3 blocks, context 256), interleaved rounds, medians; "
        f"{r['new_tokens']} new tokens per request, inside both contexts.",
        "",
        "| measure | classic | modern | modern / classic |",
        "|---|---|---|---|",
    ]
    for key, ratio in r["new_over_old"].items():
        lines.append(
            f"| {key.replace('_', ' ')} | {fmt(r['median']['old'][key])} | "
            f"{fmt(r['median']['new'][key])} | {ratio:.2f}x |"
        )
    return lines + [""]


def context_section(r: dict) -> list[str]:
    lines = ["## Engine speed as the context grows", ""] + header(r)
    model = r["model"]
    lines += [
        f"The default model's shape ({model['n_layer']} layers x {model['n_embd']}, "
        f"{model.get('position', 'learned')} positions), random weights, with each "
        "context: prompts of half the context, then new tokens up to the end of it.",
        "",
        "| context | streams | tokens/s |",
        "|---|---|---|",
    ]
    lines += [
        f"| {row['context']} | {row['streams']} | {fmt(row['tokens_per_s'])} |" for row in r["rows"]
    ]
    return lines + [""]


def ablation_section(r: dict) -> list[str]:
    lines = ["## GPT ablation", ""]
    table = ROOT / "docs" / "gpt_ablation.md"
    if table.is_file():
        lines += [table.read_text().rstrip(), ""]
    return lines + ["![validation curves](gpt_ablation.png)", ""]


def peers_section(r: dict) -> list[str]:
    lines = ["## Peers: llama.cpp and CTranslate2 on the same weights", ""] + header(r)
    lines += [
        "The checkpoint exported with `lm export` (transformers folder, f32 GGUF), the folder "
        "converted to CTranslate2 (float32, int8); greedy outputs checked against lm's before "
        "timing. Generated tokens/s including prefill, a 16-token prompt per sequence (each "
        "different) plus enough new tokens to fill the context; every engine timed with 1 and "
        "2 threads (CTranslate2 at batch 1 with 1), the best shown; cells interleaved round "
        f"robin, {r['rounds']} rounds, median (range). llama.cpp is `llama-batched-bench` "
        "(it feeds tokens without sampling).",
        "",
    ]
    for model in r["models"]:
        lines += _peers_model(model)
    return lines


def _peers_model(m: dict) -> list[str]:
    batches = sorted({row["batch"] for row in m["engines"]})
    engines = list(dict.fromkeys(row["engine"] for row in m["engines"]))
    cell = {(row["engine"], row["batch"]): row for row in m["engines"]}
    lines = [
        f"### {m['checkpoint']} ({m['shape']}, {fmt(m['params'])} parameters, context "
        f"{m['block_size']}; {m['prompt_tokens']} + {m['new_tokens']} tokens)",
        "",
    ]
    differing = [a for a in m["agreement"] if not a["same"]]
    lines += [
        f"Greedy agreement: {len(m['agreement']) - len(differing)} of {len(m['agreement'])} "
        "continuations equal to lm's"
        + (
            "; differing: "
            + "; ".join(
                f"{a['peer']} from token {a['first_difference']} of {a['tokens']} "
                f"({a['off_argmax']} tokens off lm's argmax, within {a['worst_gap']:.3f} logits)"
                for a in differing
            )
            if differing
            else ""
        )
        + ".",
        "",
        "| engine | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for engine in engines:
        cells = []
        for b in batches:
            row = cell.get((engine, b))
            cells.append(
                f"{fmt(row['median'])} ({fmt(row['min'])}-{fmt(row['max'])}), {row['variant']}"
                if row
                else "-"
            )
        lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    ratio = {row["batch"]: row for row in m["engine_ratios"]}
    lines.append(
        "| **lm / best peer** | "
        + " | ".join(
            f"**{ratio[b]['ratio']:.2f}x** ({ratio[b]['best_peer']})" if b in ratio else "-"
            for b in batches
        )
        + " |"
    )
    lines.append("")
    if m["http"]:
        lines += [
            f"Through HTTP (`lm serve` and `llama-server` on the same GGUF, aiohttp clients, "
            f"greedy, {m['new_tokens'] - 1} tokens per answer):",
            "",
            "| server | clients | stream | tokens/s | mean TTFT ms | failed | short |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in sorted(m["http"], key=lambda x: (x["stream"], x["clients"], x["server"])):
            lines.append(
                f"| {row['server']} | {row['clients']} | {'yes' if row['stream'] else 'no'} | "
                f"{fmt(row['median'])} ({fmt(row['min'])}-{fmt(row['max'])}) | "
                f"{fmt(row['mean_ttft_ms'], 1)} | {row['failed']} | {row['short']} |"
            )
        lines += ["", "lm serve / llama-server: "]
        lines[-1] += (
            "; ".join(
                f"{row['clients']} clients{' streaming' if row['stream'] else ''} "
                f"**{row['ratio']:.2f}x**"
                for row in sorted(m["http_ratios"], key=lambda x: (x["stream"], x["clients"]))
            )
            + "."
        )
        lines.append("")
    return lines


def main() -> None:
    parts = [
        "# Benchmarks",
        "",
        "Every number here was written by the command shown above its table; the JSON "
        "behind it is in `bench/results/`. Rebuild this page with `python -m bench.report`. "
        "Machines are noisy: compare numbers within one run (the ratios), not across runs.",
        "",
    ]
    for name, section in (
        ("train", train_section),
        ("ddp", ddp_section),
        ("decode", decode_section),
        ("engine", engine_section),
        ("precision", precision_section),
        ("serve", serve_section),
        ("peers", peers_section),
        ("stream", stream_section),
        ("fewshot", fewshot_section),
        ("prefix", prefix_section),
        ("blocks", blocks_section),
        ("context", context_section),
        ("gpt_ablation", ablation_section),
        ("cuda", cuda_section),
    ):
        result = load(name)
        if result is not None:
            parts += section(result)
    for name, title in (
        ("locust", "Locust, 100 users for 60 s"),
        ("soak", "Soak, 100 users for 5 minutes"),
    ):
        result = load(name)
        if result is not None:
            parts += locust_section(result, title)
    extra = ROOT / "docs" / "benchmarks-notes.md"
    if extra.is_file():
        parts += [extra.read_text().rstrip(), ""]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(parts))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
