"""bench/peers.py's pure parts: llama-batched-bench's table, the summaries and the report."""

from pathlib import Path

import pytest

from bench.peers import http_table, ratios, summarize
from bench.peers_engines import generated_rates, parse_batched_bench
from bench.report import peers_section

SAMPLE = Path(__file__).parent / "data" / "llama-batched-bench.txt"


def test_batched_bench_table_is_parsed_by_column():
    rows = parse_batched_bench(SAMPLE.read_text())
    assert len(rows) == 6
    assert rows[0] == {
        "PP": 128,
        "TG": 128,
        "B": 1,
        "N_KV": 256,
        "T_PP s": 0.108,
        "S_PP t/s": 1186.64,
        "T_TG s": 3.079,
        "S_TG t/s": 41.57,
        "T s": 3.187,
        "S t/s": 80.32,
    }
    assert [(r["B"], r["TG"]) for r in rows] == [
        (1, 128),
        (2, 128),
        (4, 128),
        (8, 128),
        (1, 256),
        (32, 256),
    ]


def test_generated_rate_counts_only_generated_tokens_over_the_whole_time():
    rows = parse_batched_bench(SAMPLE.read_text())
    rates = generated_rates(rows)
    assert rates[0] == pytest.approx(128 / 3.187)
    assert rates[-1] == pytest.approx(32 * 256 / 22.633)
    # the tool's own S column counts prompt tokens too
    assert rates[0] == pytest.approx(rows[0]["S t/s"] / 2, rel=1e-3)


def test_no_table_no_rows():
    assert parse_batched_bench("main: error: unable to load model\n") == []


SAMPLES = [
    {"engine": e, "variant": v, "batch": b, "round": r, "tokens_per_s": rate}
    for e, v, b, r, rate in [
        ("lm", "1 threads", 1, 0, 900.0),
        ("lm", "1 threads", 1, 1, 1000.0),
        ("lm", "2 threads", 1, 0, 700.0),
        ("lm", "2 threads", 1, 1, 750.0),
        ("CTranslate2 int8", "1 threads", 1, 0, 3000.0),
        ("CTranslate2 int8", "1 threads", 1, 1, 3400.0),
        ("llama.cpp f32", "2 threads", 1, 0, 2000.0),
        ("llama.cpp f32", "2 threads", 1, 1, 2200.0),
    ]
]


def test_summary_keeps_each_engines_best_variant_by_median_over_rounds():
    table = {row["engine"]: row for row in summarize(SAMPLES, ("engine", "batch"), "variant")}
    assert table["lm"]["variant"] == "1 threads"
    assert (table["lm"]["median"], table["lm"]["min"], table["lm"]["max"]) == (950.0, 900.0, 1000.0)
    assert table["CTranslate2 int8"]["median"] == 3200.0


def test_ratio_is_lm_over_the_best_peer():
    table = summarize(SAMPLES, ("engine", "batch"), "variant")
    [ratio] = ratios(table, "engine", ("batch",))
    assert ratio["best_peer"] == "CTranslate2 int8"
    assert ratio["ratio"] == pytest.approx(950 / 3200)


def test_report_shows_the_table_and_the_ratio():
    table = summarize(SAMPLES, ("engine", "batch"), "variant")
    http = http_table(
        [
            {"server": server, "clients": 64, "stream": True, "round": r, "tokens_per_s": rate}
            | {"mean_ttft_ms": ttft, "failed": 0, "short": 0}
            for server, r, rate, ttft in [
                ("lm serve", 0, 6000.0, 30.0),
                ("lm serve", 1, 5000.0, 40.0),
                ("llama-server", 0, 2000.0, 90.0),
                ("llama-server", 1, 2400.0, 110.0),
            ]
        ]
    )
    result = {
        "command": "python -m bench.peers",
        "date": "2026-11-30 10:00",
        "machine": "2 cores",
        "revision": "abc",
        "rounds": 2,
        "models": [
            {
                "checkpoint": "shakespeare-char-gpt",
                "shape": "6x192, 6 heads",
                "params": 2669376,
                "block_size": 128,
                "prompt_tokens": 16,
                "new_tokens": 112,
                "agreement": [
                    {"peer": "llama.cpp", "same": True, "tokens": 112},
                    {
                        "peer": "CTranslate2 int8",
                        "same": False,
                        "first_difference": 40,
                        "tokens": 112,
                        "off_argmax": 3,
                        "worst_gap": 0.2,
                    },
                ],
                "engines": table,
                "engine_ratios": ratios(table, "engine", ("batch",)),
                "http": http,
                "http_ratios": ratios(http, "server", ("clients", "stream")),
            }
        ],
    }
    text = "\n".join(peers_section(result))
    assert "| lm | 950 (900-1,000), 1 threads |" in text
    assert "**0.30x** (CTranslate2 int8)" in text
    assert "1 of 2 continuations equal to lm's" in text
    assert "CTranslate2 int8 from token 40 of 112" in text
    assert "| lm serve | 64 | yes | 5,500 (5,000-6,000) | 35.0 | 0 | 0 |" in text
    assert "64 clients streaming **2.50x**" in text


def test_a_stream_bench_variant_is_environment_then_arguments():
    from bench.serve_bench import split_variant

    assert split_variant('OMP_WAIT_POLICY=passive --stream-chunk-rate 0 --x="a b"') == (
        {"OMP_WAIT_POLICY": "passive"},
        ["--stream-chunk-rate", "0", "--x=a b"],
    )
    assert split_variant("") == ({}, [])


def test_the_stream_report_names_each_variant_old_results_by_their_interval():
    from bench.report import stream_section

    common = {"date": "d", "machine": "m", "revision": "r", "checkpoint": "c", "tokens": 9}
    row = {
        "clients": 64,
        "stream": True,
        "rounds": 1,
        "tokens_per_s": 9000.0,
        "tokens_per_s_range": [8000.0, 9500.0],
        "ttft_p50_ms": 100.0,
        "itl_p50_ms": 40.0,
        "itl_p99_ms": 50.0,
        "mean_tokens_per_chunk": 6.0,
    }
    new = stream_section({**common, "command": "x", "rows": [{**row, "variant": ""}]})
    old = stream_section({**common, "command": "y", "rows": [{**row, "flush_ms": 25.0}]})
    assert any(line.startswith("| (defaults) | 64 | yes | 9,000 (8,000-9,500)") for line in new)
    assert any(line.startswith("| `--stream-flush-ms 25` | 64 | yes |") for line in old)
