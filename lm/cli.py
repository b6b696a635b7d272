"""The `lm` command: train, eval, generate, serve, checkpoints and more.

Every user mistake becomes one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lm.errors import LMError


def _load_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise LMError(f"--config {path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise LMError(f"--config {path}: not valid TOML ({exc})") from exc
    return {k.replace("-", "_"): v for k, v in data.items()}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# -- train --------------------------------------------------------------------------------


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a language model on a text corpus",
                       description="Train a model; flags override the keys of --config.")
    p.add_argument("--config", help="recipe.toml with the same keys as these flags")
    p.add_argument("--corpus", action="append", help="UTF-8 text file (repeatable)")
    p.add_argument("--out", help="checkpoint directory to write (default runs/model)")
    p.add_argument("--tokenizer", choices=["char", "word", "bpe", "spm"])
    p.add_argument("--vocab-size", type=_positive_int)
    p.add_argument("--model", choices=["rnn", "gru", "lstm", "gpt"])
    p.add_argument("--n-layer", type=_positive_int)
    p.add_argument("--n-embd", type=_positive_int)
    p.add_argument("--n-head", type=_positive_int)
    p.add_argument("--block-size", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--position", choices=["learned", "rope"], help="GPT positions (learned)")
    p.add_argument("--rope-theta", type=float, help="rotary base (10000)")
    p.add_argument("--norm", choices=["layernorm", "rmsnorm"], help="GPT norm (layernorm)")
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="RMSNorm per head on queries and keys")
    p.add_argument("--mlp", choices=["gelu", "relu2", "swiglu"], help="GPT MLP (gelu)")
    p.add_argument("--mlp-hidden", type=_positive_int, help="MLP width (4x; swiglu 8/3x)")
    p.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="output layer shares the token embedding (default yes)")
    p.add_argument("--zero-init-proj", action=argparse.BooleanOptionalAction, default=None,
                   help="zero-initialise the blocks' output projections")
    p.add_argument("--logit-softcap", type=float, help="cap*tanh(logits/cap); 0 = off")
    p.add_argument("--optimizer", choices=["adamw", "muon"],
                   help="muon: Muon for the blocks' matrices, AdamW for the rest")
    p.add_argument("--muon-lr", type=float, help="Muon's peak lr (0.02)")
    p.add_argument("--muon-momentum", type=float)
    p.add_argument("--muon-weight-decay", type=float)
    p.add_argument("--schedule", choices=["cosine", "warmdown"],
                   help="after warm-up: cosine to --min-lr, or constant then linear to 0")
    p.add_argument("--warmdown-frac", type=float, help="last fraction that warmdown decays (0.3)")
    p.add_argument("--max-time", type=float, metavar="SECONDS",
                   help="stop when this much training time is spent; the lr schedule "
                        "follows the larger of the step and time fractions")
    p.add_argument("--dtype", choices=["auto", "best", "float32", "bfloat16"],
                   help="training precision: bfloat16 autocast; auto: bfloat16 on CUDA; "
                        "best: also on CPUs with bfloat16 hardware (AVX512-BF16, AMX)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model for training")
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-steps", type=_positive_int)
    p.add_argument("--eval-interval", type=_positive_int)
    p.add_argument("--eval-tokens", type=_positive_int)
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from lm.train import TrainConfig, run_training

    settings = _load_toml(args.config) if args.config else {}
    if "corpus" in settings and args.config:  # recipe paths are relative to the recipe
        base = Path(args.config).parent
        corpus = settings["corpus"] if isinstance(settings["corpus"], list) else [settings["corpus"]]
        settings["corpus"] = [str(_relative_to(base, c)) for c in corpus]
    if "out" in settings and args.config:
        settings["out"] = str(_relative_to(Path(args.config).parent, settings["out"]))
    skip = {"config", "func", "command", "no_progress"}
    settings.update({k: v for k, v in vars(args).items() if k not in skip and v is not None})
    config = TrainConfig.from_dict(settings)
    summary = run_training(config, progress=not args.no_progress)
    if "val_loss" in summary:
        print(f"best validation loss {summary['val_loss']:.4f} "
              f"(perplexity {summary['val_perplexity']:.2f}, {summary['val_bpc']:.3f} bits/char) "
              f"saved in {config.out}")
    return 0


def _relative_to(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


# -- eval ---------------------------------------------------------------------------------


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits/char of a checkpoint on a corpus")
    p.add_argument("--checkpoint", required=True, help="shipped name or directory")
    p.add_argument("--corpus", action="append", required=True)
    p.add_argument("--split", choices=["val", "all"], default="val",
                   help="the held-out tail the model was validated on (default) or the whole corpus")
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--max-tokens", type=_positive_int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    result = evaluate_checkpoint(args.checkpoint, args.corpus, args.split, args.val_fraction,
                                 args.max_tokens, args.device)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
              f"bpc {result['bpc']:.4f}  tokens {result['tokens']}")
    return 0


def evaluate_checkpoint(checkpoint, corpus, split="val", val_fraction=None, max_tokens=None,
                        device="auto") -> dict:
    """The one evaluation used by `lm eval`, the shipped-checkpoint test and the benchmarks."""
    from lm.checkpoint import load_checkpoint
    from lm.data import read_corpus, split_text, to_tensor
    from lm.device import pick_device
    from lm.train import evaluate

    torch_device = pick_device(device)
    ckpt = load_checkpoint(checkpoint, torch_device)
    text = read_corpus(corpus)
    if split == "val":
        fraction = val_fraction or ckpt.training.get("val_fraction", 0.1)
        text = split_text(text, fraction)[1]
    ids = to_tensor(ckpt.tokenizer.encode(text))
    if len(ids) < 2:
        raise LMError("the evaluation text is shorter than two tokens")
    return evaluate(ckpt.model, ids, len(text), max_tokens, torch_device)


# -- generate -----------------------------------------------------------------------------

MAX_NEW_TOKENS_LIMIT = 100_000


def _unit_interval(text: str) -> float:
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _max_new_tokens(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_NEW_TOKENS_LIMIT:
        raise argparse.ArgumentTypeError(f"at most {MAX_NEW_TOKENS_LIMIT:,}, got {value:,}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_generate(sub) -> None:
    from lm.checkpoint import DEFAULT_CHECKPOINT

    p = sub.add_parser("generate", help="generate text from a prompt (streams to the terminal)")
    p.add_argument("prompt", nargs="?", default=None,
                   help="the prompt; '-' or nothing reads standard input. With few-shot "
                        "examples, the query")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="shipped name or directory")
    p.add_argument("--max-new-tokens", type=_max_new_tokens, default=256)
    p.add_argument("--temperature", type=_non_negative_float, default=0.8,
                   help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=_non_negative_int, default=0, help="0 turns it off")
    p.add_argument("--top-p", type=_unit_interval, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument("--stop", action="append", default=None, help="stop sequence (repeatable)")
    p.add_argument("--n", type=_positive_int, default=1, help="samples per prompt")
    p.add_argument("--example", action="append", default=None, metavar="IN=>OUT",
                   help="a few-shot example (repeatable)")
    p.add_argument("--examples", metavar="FILE.jsonl", help='few-shot examples {"input", "output"}')
    p.add_argument("--template", default=None, help="few-shot template (default '{input} => {output}\\n')")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from lm.checkpoint import load_checkpoint
    from lm.device import pick_device
    from lm.engine import SamplingParams
    from lm.fewshot import DEFAULT_TEMPLATE, build_prompt, load_examples, parse_example
    from lm.generate import Generator

    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    stop = list(args.stop or [])
    examples = [parse_example(e) for e in args.example or []]
    if args.examples:
        examples += load_examples(args.examples)
    if examples:
        prompt, default_stop = build_prompt(examples, prompt.strip("\n"),
                                            args.template or DEFAULT_TEMPLATE)
        stop = stop or default_stop
    elif args.template:
        raise LMError("--template needs few-shot examples (--example or --examples)")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=stop)
    params.validate()
    checkpoint = load_checkpoint(args.checkpoint, pick_device(args.device))
    generator = Generator(checkpoint)
    out = sys.stdout
    if args.n == 1:
        for piece in generator.stream(prompt, params):
            out.write(piece)
            out.flush()
        out.write("\n")
        return 0
    for number, completion in enumerate(generator.complete([prompt], params, n=args.n), 1):
        out.write(f"--- sample {number} ({completion.finish_reason}) ---\n{completion.text}\n")
    return 0


# -- checkpoints --------------------------------------------------------------------------


def add_checkpoints(sub) -> None:
    p = sub.add_parser("checkpoints", help="list the shipped checkpoints")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_checkpoints)


def cmd_checkpoints(args) -> int:
    from lm.checkpoint import TRAIN_STATE_FILE, read_config, shipped_checkpoints, shipped_dir

    rows = []
    for name in shipped_checkpoints():
        directory = shipped_dir() / name
        meta = read_config(directory)
        size = sum(p.stat().st_size for p in directory.iterdir()  # what serving needs
                   if p.is_file() and p.name != TRAIN_STATE_FILE)
        training = meta.get("training", {})
        rows.append({
            "name": name,
            "model": meta["model"]["kind"],
            "tokenizer": meta["tokenizer"]["kind"],
            "params": meta.get("num_params"),
            "size_mb": round(size / 1e6, 1),
            "val_loss": training.get("val_loss"),
            "val_bpc": training.get("val_bpc"),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no shipped checkpoints in {shipped_dir()}")
        return 0
    print(f"{'name':<26} {'model':<5} {'tokens':<6} {'params':>9} {'size':>8} {'val loss':>8} {'bpc':>6}")
    for r in rows:
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        bpc = f"{r['val_bpc']:.3f}" if r["val_bpc"] is not None else "-"
        print(f"{r['name']:<26} {r['model']:<5} {r['tokenizer']:<6} {r['params'] or 0:>9,} "
              f"{r['size_mb']:>6.1f}MB {loss:>8} {bpc:>6}")
    return 0


# -- serve --------------------------------------------------------------------------------


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve checkpoints over an OpenAI-compatible HTTP API",
                       description="Every flag also reads from an LM_* environment variable "
                                   "(LM_HOST, LM_PORT, LM_CHECKPOINTS, LM_API_KEY, ...).")
    p.add_argument("--checkpoint", action="append", default=None,
                   help="shipped name or directory (repeatable; default shakespeare-char-gpt)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default 8000")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-batch", type=_positive_int, default=None, help="sequences per step (64)")
    p.add_argument("--max-queue", type=_non_negative_int, default=None,
                   help="waiting requests before 429 (256)")
    p.add_argument("--max-tokens-limit", type=_positive_int, default=None)
    p.add_argument("--max-body-bytes", type=_positive_int, default=None)
    p.add_argument("--max-prompt-chars", type=_positive_int, default=None)
    p.add_argument("--cors-origin", action="append", default=None, dest="cors_origins",
                   help="allow browser calls from this origin (repeatable; default none)")
    p.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    p.add_argument("--torch-threads", type=_positive_int, default=None,
                   help="model CPU threads (default: one per core)")
    p.add_argument("--stream-interval", type=_positive_int, default=None,
                   help="generated tokens per streamed chunk (default 1: every token; more "
                        "means fewer, larger server-sent events for less CPU per token)")
    p.add_argument("--kv-cache-dtype", default=None,
                   choices=("auto", "float32", "float16", "bfloat16"),
                   help="GPT KV cache precision (default auto: bfloat16 on the CPU when the "
                        "native attention kernel is built, else the model's)")
    p.add_argument("--shutdown-timeout", type=float, default=None,
                   help="seconds to finish running requests on SIGTERM (30)")
    p.add_argument("--log-level", default=None)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import signal

    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings

    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k not in ("func", "command", "checkpoint")}
    if args.checkpoint:
        overrides["checkpoints"] = args.checkpoint
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise LMError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    from lm.checkpoint import load_checkpoint
    from lm.device import pick_device, serving_threads

    # Before any tensor work here: the engines' threads run the models (see serving_threads).
    serving_threads(settings.torch_threads)
    device = pick_device(settings.device)
    checkpoints = [load_checkpoint(name, device) for name in settings.checkpoints]
    names = [c.name for c in checkpoints]
    if len(set(names)) != len(names):
        raise LMError(f"two checkpoints share a name: {names}")
    app = create_app(settings, checkpoints)
    from lm import native

    kernel = "native" if device.type == "cpu" and native.decode_attention() else "PyTorch"
    print(f"lm serve: {', '.join(names)} on http://{settings.host}:{settings.port} "
          f"(device {device}, max batch {settings.max_batch}, {kernel} decode attention)",
          file=sys.stderr)
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found:
    # with the default one the process would die by the signal (exit -15) after a clean drain.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=settings.shutdown_timeout or None)
    return 0


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


# -- loadtest -----------------------------------------------------------------------------

def _run_time(text: str) -> str:
    """Locust's duration: `90`, `60s`, `5m`, `1h30m`."""
    import re

    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())
    if text.strip().isdigit():
        seconds = int(text)
    elif match and text.strip():
        hours, minutes, secs = (int(g or 0) for g in match.groups())
        seconds = 3600 * hours + 60 * minutes + secs
    else:
        raise argparse.ArgumentTypeError(f"expected a duration like 60s, 5m or 1h30m, got {text!r}")
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1s, got {text!r}")
    return text.strip()


def _http_url(text: str) -> str:
    from urllib.parse import urlparse

    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError(f"expected a URL like http://127.0.0.1:8000, got {text!r}")
    return text.rstrip("/")


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def default_locustfile() -> Path:
    """service/locustfile.py, installed next to the `lm` package."""
    return Path(__file__).resolve().parent.parent / "service" / "locustfile.py"


def add_loadtest(sub) -> None:
    p = sub.add_parser("loadtest", help="load-test a running server with locust (headless)",
                       description="Run service/locustfile.py headless against a server, write "
                                   "CSV and HTML reports to --out and print a summary. Exit "
                                   "status 1 when any request failed.")
    p.add_argument("--host", type=_http_url, default="http://127.0.0.1:8000",
                   help="server URL (default http://127.0.0.1:8000)")
    p.add_argument("--users", type=_positive_int, default=100, help="concurrent users (100)")
    p.add_argument("--spawn-rate", type=_positive_float, default=20.0,
                   help="users started per second (20)")
    p.add_argument("--run-time", type=_run_time, default="60s", help="60s, 5m, 1h30m (60s)")
    p.add_argument("--out", default="runs/loadtest", help="report directory (runs/loadtest)")
    p.add_argument("--model", default=None, help="model name to request (LM_MODEL; default "
                                                 "shakespeare-char-gpt)")
    p.add_argument("--locustfile", default=None, help="default: service/locustfile.py")
    p.set_defaults(func=cmd_loadtest)

    def one_line_error(message: str):  # argparse's usage block would make it several lines
        p.exit(2, f"{p.prog}: error: {message}\n")

    p.error = one_line_error


def _locust_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("locust") is not None


def cmd_loadtest(args) -> int:
    import os
    import subprocess

    locustfile = Path(args.locustfile) if args.locustfile else default_locustfile()
    if not locustfile.is_file():
        raise LMError(f"--locustfile {locustfile}: no such file")
    if not _locust_available():
        raise LMError('locust is not installed; run: pip install -e ".[load]"')
    _check_server(args.host)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats_csv = out / "locust_stats.csv"
    stats_csv.unlink(missing_ok=True)  # never summarise a previous run
    command = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless",
               "-u", str(args.users), "-r", f"{args.spawn_rate:g}", "-t", args.run_time,
               "--host", args.host, "--csv", str(out / "locust"),
               "--html", str(out / "report.html"), "--only-summary"]
    env = dict(os.environ)
    if args.model:
        env["LM_MODEL"] = args.model
    print(f"lm loadtest: {args.users} users (+{args.spawn_rate:g}/s) for {args.run_time} "
          f"against {args.host}", file=sys.stderr, flush=True)
    returncode = subprocess.run(command, env=env).returncode
    if not stats_csv.is_file():
        raise LMError(f"locust exited with status {returncode} without writing {stats_csv} "
                      "(see its output above)")
    rows = read_locust_stats(stats_csv)
    print(format_loadtest_summary(rows))
    print(f"report: {out / 'report.html'}")
    total = rows[-1] if rows else {"failures": 0}
    if total["failures"]:
        print(f"lm loadtest: {total['failures']} failed requests "
              f"(details in {out / 'locust_failures.csv'})", file=sys.stderr)
        return 1
    if returncode:
        print(f"lm loadtest: locust exited with status {returncode} (errors in the locustfile? "
              f"see {out / 'locust_exceptions.csv'})", file=sys.stderr)
    return returncode


def _check_server(host: str) -> None:
    """Fail fast, in one line, when nothing listens at `host` (any HTTP answer will do)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{host}/health", timeout=5).close()
    except urllib.error.HTTPError:
        pass  # it answered: draining, or behind a key; locust will tell
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LMError(f"no server at {host} ({reason}); start one with `lm serve`") from None


def read_locust_stats(path: Path) -> list[dict]:
    """Locust's *_stats.csv as one dict per endpoint, the `Aggregated` row last."""
    import csv

    def number(value: str) -> float | None:
        try:
            return float(value)
        except (TypeError, ValueError):
            return None  # N/A when an endpoint saw no request

    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows.append({
                "name": " ".join(p for p in (row.get("Type"), row.get("Name")) if p),
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "rps": number(row["Requests/s"]) or 0.0,
                "p50_ms": number(row.get("50%")),
                "p99_ms": number(row.get("99%")),
            })
    rows.sort(key=lambda r: r["name"] == "Aggregated")
    return rows


def format_loadtest_summary(rows: list[dict]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    width = max([len(r["name"]) for r in rows] + [8])
    lines = [f"{'endpoint':<{width}} {'requests':>9} {'failures':>9} {'req/s':>8} "
             f"{'p50 ms':>8} {'p99 ms':>8}"]
    for r in rows:
        lines.append(f"{r['name']:<{width}} {r['requests']:>9,} {r['failures']:>9,} "
                     f"{r['rps']:>8.1f} {ms(r['p50_ms']):>8} {ms(r['p99_ms']):>8}")
    return "\n".join(lines)


# -- make-tasks, fewshot-eval -------------------------------------------------------------


def add_make_tasks(sub) -> None:
    p = sub.add_parser("make-tasks", help="write an in-context-learning corpus of few-shot episodes",
                       description="Episodes of `input => output` lines, one random string task "
                                   "each, blank-line separated; held-out words never appear.")
    p.add_argument("--out", required=True, help="text file to write (UTF-8)")
    p.add_argument("--episodes", type=_positive_int, default=20_000)
    p.add_argument("--seed", type=int, default=0, help="same seed, same corpus")
    p.set_defaults(func=cmd_make_tasks)


def cmd_make_tasks(args) -> int:
    from lm.tasks import write_corpus

    text = write_corpus(args.out, args.episodes, args.seed)
    print(f"wrote {args.episodes:,} episodes ({len(text):,} characters) to {args.out}")
    return 0


def _shots_list(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",")]
    try:
        shots = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers like 0,1,2,4,8, got {text!r}") from None
    if any(s < 0 for s in shots):
        raise argparse.ArgumentTypeError(f"shots must be >= 0, got {text!r}")
    return sorted(set(shots))


def add_fewshot_eval(sub) -> None:
    p = sub.add_parser("fewshot-eval", help="exact-match accuracy on held-out few-shot episodes",
                       description="Greedy completions of held-out `lm make-tasks` episodes, "
                                   "scored by exact match, per number of shots and per task.")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="shipped name or directory (repeatable)")
    p.add_argument("--shots", type=_shots_list, default=[0, 1, 2, 4, 8],
                   help="comma-separated numbers of examples (default 0,1,2,4,8)")
    p.add_argument("--episodes", type=_positive_int, default=200, help="per number of shots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true",
                   help='print {checkpoint: {shots: {"overall", "seen_tasks", "unseen_tasks", '
                        '"per_task"}}}')
    p.add_argument("--plot", metavar="FILE.png", help="save accuracy vs shots, a line per checkpoint")
    p.set_defaults(func=cmd_fewshot_eval)


def cmd_fewshot_eval(args) -> int:
    from lm.checkpoint import load_checkpoint
    from lm.device import pick_device
    from lm.tasks import accuracy_table, fewshot_accuracy, plot_accuracy

    device = pick_device(args.device)
    results = {}
    for name in args.checkpoint:
        checkpoint = load_checkpoint(name, device)
        results[name] = fewshot_accuracy(checkpoint, args.shots, args.episodes, args.seed)
    if args.plot:
        plot_accuracy(results, args.plot)
    if args.json:
        print(json.dumps(results))
        return 0
    for name, result in results.items():
        print(f"{name}: exact match (%) on {args.episodes} held-out episodes, seed {args.seed}")
        print(accuracy_table(result))
        print()
    if args.plot:
        print(f"plot saved to {args.plot}")
    return 0


# -- neighbors ----------------------------------------------------------------------------


def add_neighbors(sub) -> None:
    from lm.checkpoint import DEFAULT_CHECKPOINT

    p = sub.add_parser("neighbors", help="tokens with the most similar input embeddings")
    p.add_argument("token", help="a token of the checkpoint's vocabulary (a character for char models)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="shipped name or directory")
    p.add_argument("-k", type=_positive_int, default=10, help="how many (default 10)")
    p.set_defaults(func=cmd_neighbors)


def cmd_neighbors(args) -> int:
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


# -- main ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_train(sub)
    add_eval(sub)
    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return parser


_EXTRA_COMMANDS: list = [add_generate, add_checkpoints, add_serve, add_loadtest]
_EXTRA_COMMANDS += [add_make_tasks, add_fewshot_eval, add_neighbors]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except LMError as exc:
        print(f"lm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
