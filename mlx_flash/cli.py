"""The `mlx-flash` command: a thin Typer layer; each command calls one library function."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import FlashError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# Shared option types
ModelOpt = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="HF checkpoint dir or flash dir. Default: the embedded demo model."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
MemoryOpt = Annotated[
    str | None,
    typer.Option("--memory", help="Memory budget: bytes (8GB, 512MiB), a RAM fraction (0.25) or 50%model. Default 0.5."),
]
ModeOpt = Annotated[
    str,
    typer.Option("--mode", help="auto (dense if it fits), dense, naive, oracle or predicted."),
]
WindowOpt = Annotated[
    int, typer.Option("--window", min=1, help="Keep the neurons of the last W tokens cached.")
]
MaxContextOpt = Annotated[
    int | None,
    typer.Option("--max-context", min=16, help="Tokens of KV cache to reserve in the budget."),
]


def friendly(fn):
    """Known errors become one line on stderr and exit 1 (traceback with MLX_FLASH_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FlashError, OSError) as e:
            if os.environ.get("MLX_FLASH_DEBUG") == "1":
                raise
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def _root():
    """Run language models larger than memory: FFN neurons streamed from flash (LLM in a flash)."""


def _model_path(model: Path | None) -> Path:
    from .generation import DEFAULT_MODEL

    return model if model is not None else DEFAULT_MODEL


def _load(model: Path | None, memory, mode, window, max_context):
    from .api import load
    from .memory import budget_note

    kwargs = {} if max_context is None else {"max_context": max_context}
    m, tok = load(_model_path(model), memory=memory, mode=mode, window=window, **kwargs)
    if note := budget_note(getattr(m, "flash_budget", {}).get("total", 0)):
        typer.echo(note, err=True)
    if getattr(m, "flash_mode", "dense") == "dense" and memory is not None and mode == "auto":
        typer.echo("note: the whole model fits the memory budget; loaded densely", err=True)
    if mode in ("auto", "predicted") and getattr(m, "flash_mode", "") == "oracle":
        typer.echo("note: no predictors in this model dir; the exact oracle picks the neurons "
                   "(run `mlx-flash calibrate`)", err=True)
    return m, tok


# Generation options shared by generate, chat and batch
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate.")]
TempOpt = Annotated[float, typer.Option("--temp", min=0.0, help="Sampling temperature; 0 is greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling: keep the smallest set of tokens with this probability mass (0 or 1: off).")]
RepetitionPenaltyOpt = Annotated[float | None, typer.Option("--repetition-penalty", min=0.0, help="Penalize tokens of the last 20 (> 1 discourages repeats).")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this text (not printed); repeat for several.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")]


@app.command()
@friendly
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text; - reads it from stdin.")],
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 100,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 0.0,
    repetition_penalty: RepetitionPenaltyOpt = None,
    stop: StopOpt = None,
    seed: SeedOpt = None,
    memory: MemoryOpt = None,
    mode: ModeOpt = "auto",
    window: WindowOpt = None,
    max_context: MaxContextOpt = None,
    as_json: JsonOpt = False,
):
    """Generate text from a prompt, streaming it as it is produced."""
    from . import generation as gen

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        raise FlashError("the prompt is empty")
    model_obj, tokenizer = _load(model, memory, mode, window, max_context)
    on_text = None if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    result = gen.generate(
        model_obj, tokenizer, prompt, max_tokens=max_tokens, temp=temp, top_p=top_p,
        repetition_penalty=repetition_penalty, stop=stop, seed=seed, on_text=on_text,
    )
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo("")
    typer.echo(_summary(result["stats"]), err=True)


def _summary(s: dict) -> str:
    parts = [f"{s.get('generation_tokens', 0)} tokens", f"{s.get('tokens_per_s', 0):.1f} tok/s",
             f"mode {s.get('mode', 'dense')}"]
    if "flash_bytes_per_token" in s:
        hit = s.get("cache_hit_rate")
        parts += [
            f"flash {s['flash_bytes_per_token'] / 2**20:.2f} MiB/token in "
            f"{s['read_requests_per_token']:.0f} reads",
            f"I/O {s['io_ms_per_token']:.1f} ms + cache {s['cache_ms_per_token']:.1f} ms"
            f" + compute {s['compute_ms_per_token'] or 0:.1f} ms per token",
            f"cache hits {hit:.0%}" if hit is not None else "no cache",
            f"budget {s['memory_budget_bytes'] / 2**20:.1f} MiB",
        ]
    parts.append(f"peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB")
    return "[" + ", ".join(parts) + "]"


@app.command()
@friendly
def convert(
    source: Annotated[str, typer.Argument(help="Local HF checkpoint dir or Hub repo id (facebook/opt-1.3b).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output dir. Default models/<name>-flash.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="float16, bfloat16 or float32. Default: as stored.")] = None,
    align: Annotated[int, typer.Option("--align", help="Bundle alignment in bytes (16384 = Apple SSD page; 4096 allowed).")] = 16384,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing flash dir.")] = False,
    as_json: JsonOpt = False,
):
    """Convert an OPT or Llama checkpoint into a flash model dir (bundled FFN neurons)."""
    from . import format as fmt
    from .convert import convert as run

    path = run(source, out=out, dtype=dtype, align=align, force=force, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(fmt.info(path)))
    else:
        typer.echo(f"wrote {path}")


@app.command()
@friendly
def info(
    path: Annotated[Path, typer.Argument(help="A flash model dir.")],
    as_json: JsonOpt = False,
):
    """Describe a flash model dir: architecture, dims, dtype, sizes, alignment, format version."""
    from . import format as fmt

    data = fmt.info(path)
    if as_json:
        typer.echo(json.dumps(data))
        return
    width = max(len(k) for k in data)
    for k, v in data.items():
        if isinstance(v, int) and k.endswith("bytes") and v >= 2**20:
            v = f"{v} ({v / 2**20:.1f} MiB)"
        typer.echo(f"{k:<{width}}  {v}")


@app.command()
@friendly
def calibrate(
    path: Annotated[Path, typer.Argument(help="A flash model dir (from `mlx-flash convert`).")],
    data: Annotated[Path, typer.Option("--data", help="Calibration text file (training-like text).")],
    tokens: Annotated[int, typer.Option("--tokens", min=512, help="Calibration tokens.")] = 200_000,
    rank: Annotated[int | None, typer.Option("--rank", min=1, help="One predictor rank for every layer.")] = None,
    ranks: Annotated[str | None, typer.Option("--ranks", help="Per-layer ranks: comma list, one per layer.")] = None,
    recall: Annotated[float, typer.Option("--recall", min=0.5, max=1.0, help="Target recall of the threshold.")] = 0.95,
    sparsity: Annotated[float | None, typer.Option("--sparsity", min=0.0, max=0.99, help="Non-ReLU models: fraction of |act(gate)*up| treated as inactive (default 0.5).")] = None,
    as_json: JsonOpt = False,
):
    """Train the low-rank activation predictors of a flash dir, layer by layer."""
    from .predictor import calibrate as run

    if rank is not None and ranks is not None:
        raise FlashError("give --rank or --ranks, not both")
    report = run(path, data, tokens=tokens, ranks=rank if rank is not None else ranks,
                 target_recall=recall, sparsity=sparsity, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo("layer  rank  true sparsity  predicted active  recall  precision")
    for i, row in enumerate(report["layers"]):
        typer.echo(f"{i:>5}  {row.get('rank', ''):>4}  {row['true_sparsity']:>13.3f}  "
                   f"{row['predicted_active_fraction']:>16.3f}  {row['recall']:>6.3f}  "
                   f"{row['precision']:>9.3f}")
    typer.echo(f"wrote {Path(path) / 'predictors.safetensors'}")


@app.command()
@friendly
def perplexity(
    model: Annotated[Path | None, typer.Argument(help="HF checkpoint dir or flash dir. Default: the embedded demo model.")] = None,
    data: Annotated[Path, typer.Option("--data", help="Text file to score.")] = ...,
    mode: ModeOpt = "auto",
    memory: MemoryOpt = None,
    window: WindowOpt = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="Tokens per scoring window (each starts fresh).")] = 256,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=2, help="Score at most this many tokens.")] = None,
    as_json: JsonOpt = False,
):
    """Perplexity of a model over a text file, in fixed windows: does sparsity cost quality?"""
    from .generation import flash_stats
    from .perplexity import perplexity as run

    model_obj, tokenizer = _load(model, memory, mode, window, None)
    flash = getattr(model_obj, "flash_mode", "dense") != "dense"
    result = run(model_obj, tokenizer, data, window=seq_len, max_tokens=max_tokens,
                 progress=not as_json, token_by_token=flash)
    result["mode"] = getattr(model_obj, "flash_mode", "dense")
    result["stats"] = flash_stats(model_obj)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens "
               f"({result.get('windows', '?')} windows of {seq_len} tokens, mode {result['mode']})")
    if flash:
        typer.echo(_summary({**result["stats"], "generation_tokens": result["tokens"],
                             "tokens_per_s": 0.0, "mode": result["mode"]}), err=True)


@app.command()
@friendly
def chat(
    model: ModelOpt = None,
    memory: MemoryOpt = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    max_tokens: MaxTokensOpt = 256,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 0.0,
    repetition_penalty: RepetitionPenaltyOpt = None,
    seed: SeedOpt = None,
    mode: ModeOpt = "auto",
    window: WindowOpt = None,
    max_context: MaxContextOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No stats line after each reply.")] = False,
):
    """Chat in the terminal: replies stream as they come; /help lists the commands."""
    from . import chat as chat_lib

    with chat_lib.loading(_model_path(model)):
        model_obj, tokenizer = _load(model, memory, mode, window, max_context)
    session = chat_lib.ChatSession(model_obj, tokenizer, system=system, max_tokens=max_tokens,
                                   temp=temp, top_p=top_p, repetition_penalty=repetition_penalty,
                                   seed=seed)
    chat_lib.repl(session, quiet=quiet)


@app.command()
@friendly
def batch(
    input: Annotated[Path, typer.Argument(help="JSONL file: one {\"id\", \"prompt\", options...} per line.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL results; a rerun skips the ids it holds.")],
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 100,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 0.0,
    repetition_penalty: RepetitionPenaltyOpt = None,
    stop: StopOpt = None,
    seed: SeedOpt = None,
    memory: MemoryOpt = None,
    mode: ModeOpt = "auto",
    window: WindowOpt = None,
    max_context: MaxContextOpt = None,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="Run again the ids whose record in --out is an error (the new record is appended).")] = False,
    as_json: JsonOpt = False,
):
    """Generate for every prompt of a JSONL file with one model load; resumable."""
    from . import batch as batch_lib

    plan = batch_lib.prepare(input, out, retry_errors=retry_errors)
    if plan.pending:
        if plan.done:
            typer.echo(f"resuming: {plan.done} of {len(plan.jobs)} already in {out}", err=True)
        model_obj, tokenizer = _load(model, memory, mode, window, max_context)
        defaults = dict(max_tokens=max_tokens, temp=temp, top_p=top_p,
                        repetition_penalty=repetition_penalty, stop=stop, seed=seed)
        try:
            summary = batch_lib.run(model_obj, tokenizer, plan, defaults, progress=not as_json)
        except KeyboardInterrupt:
            typer.echo(f"interrupted; {out} holds whole records only: rerun the same command "
                       "to finish", err=True)
            raise typer.Exit(130) from None
        errors = f"{summary['errors']} error{'' if summary['errors'] == 1 else 's'}"
        note = f"wrote {summary['written']} records ({errors}) to {out}"
    else:
        summary = batch_lib.run(None, None, plan, progress=False)
        note = f"nothing to do: {out} holds all {len(plan.jobs)} records"
    typer.echo(json.dumps(summary) if as_json else note, err=not as_json)


@app.command()
@friendly
def probe(
    path: Annotated[Path | None, typer.Option("--path", help="A directory on the volume that holds the models. Default: models/.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw throughput per request size into this PNG (needs matplotlib).")] = None,
    seconds: Annotated[float, typer.Option("--seconds", min=0.01, help="Measuring time per request size and thread count.")] = 0.4,
    scratch_mb: Annotated[int, typer.Option("--scratch-mb", min=16, help="Size of the scratch file read at random (removed afterwards).")] = 1024,
    fio: Annotated[bool, typer.Option("--fio", help="Also record fio's ceiling (io_uring, queue depth 32) for reference, if fio is installed.")] = False,
    as_json: JsonOpt = False,
):
    """Measure uncached random reads (4 KiB-4 MiB, 1-32 threads); save the profile the reader uses."""
    from . import probe as lib

    say = None if as_json else (lambda line: typer.echo(line, err=True))
    profile = lib.probe(path, seconds=seconds, file_bytes=scratch_mb << 20, progress=say)
    if fio:
        profile.fio = lib.fio_reference(profile.path)
    saved = lib.save_profile(profile)
    if plot is not None:
        lib.plot(profile, plot)
    if as_json:
        threads, request = profile.reader_settings(16 << 10)
        typer.echo(json.dumps({**profile.to_dict(), "saved": str(saved), "threads_16k": threads,
                               "max_request_bytes": request}))
        return
    typer.echo(lib.format_table(profile))
    if profile.fio:
        typer.echo("fio (io_uring, QD32): " + ", ".join(
            f"{int(k) >> 10} KiB {v:.3f} GB/s" for k, v in profile.fio.items()))
    typer.echo(lib.summary(profile))
    typer.echo(f"saved {saved}" + (f"; plot {plot}" if plot is not None else ""))


@app.command()
@friendly
def bench(
    model: Annotated[Path, typer.Option("--model", "-m", help="A flash model dir (mlx-flash convert, or tools/synthetic_flash.py).")],
    memory: Annotated[str, typer.Option("--memory", help="Memory budget, as for generate; enforced as a real limit where the platform allows.")] = "50%model",
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=1, help="Decode tokens per strategy.")] = 8,
    strategies: Annotated[str | None, typer.Option("--strategies", help="Comma list: dense, naive, hybrid, predicted, +window, +bundling, all, mmap, mmap-nolimit. Default: all.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt text (the same for every strategy).")] = None,
    window: WindowOpt = 4,
    max_context: Annotated[int, typer.Option("--max-context", min=16, help="Tokens of KV cache the budget reserves.")] = 256,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Dense HF checkpoint of the same weights, for the dense and mmap baselines. Default: the flash dir's source.")] = None,
    no_limit: Annotated[bool, typer.Option("--no-limit", help="Do not enforce the budget with a memory cgroup.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw ms per token per strategy into this PNG (needs matplotlib).")] = None,
    as_json: JsonOpt = False,
):
    """Compare the paper's strategies on one model and prompt, each started cold."""
    from . import bench as lib

    say = None if as_json else (lambda line: typer.echo(line, err=True))
    result = lib.bench(model, memory=memory, tokens=tokens, strategies=strategies,
                       prompt=prompt or lib.DEFAULT_PROMPT, window=window, max_context=max_context,
                       limit=not no_limit, checkpoint=checkpoint, progress=say)
    if plot is not None:
        lib.plot(result, plot)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(lib.format_table(result))


def main():
    app()


if __name__ == "__main__":
    main()
