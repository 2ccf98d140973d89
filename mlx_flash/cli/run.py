"""Commands that run a model: generate, chat, batch, perplexity."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import app
from .options import (
    JsonOpt,
    friendly,
    load_model,
    load_options,
    model_path,
    options,
    pick,
    read_prompt,
    sampling_options,
    say,
)
from .ranks import pipelined

RawOpt = Annotated[bool, typer.Option("--raw", help="Use the prompt as it is, without the tokenizer's chat template.")]


@app.command()
@friendly
@pipelined
@options(sampling_options, load_options)
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text; - reads it from stdin.")],
    raw: RawOpt = False,
    as_json: JsonOpt = False,
    **kwargs,
):
    """Generate text from a prompt, streaming it as it is produced.

    A tokenizer with a chat template (an instruct model) gets the prompt as a user message, as
    mlx-lm does; --raw passes it as it is."""
    from .. import generation as gen
    from ..state import stats_line

    prompt = read_prompt(prompt)
    model, tokenizer = load_model(**pick(kwargs, load_options), progress=not as_json)
    on_text = None if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    result = gen.generate(model, tokenizer, gen.as_chat(tokenizer, prompt, raw), on_text=on_text,
                          **pick(kwargs, sampling_options))
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo("")
    say(stats_line(result["stats"], detail=True))


@app.command()
@friendly
@pipelined
@options(load_options, sampling_options, drop=("stop",), max_tokens=256)
def chat(
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No stats line after each reply.")] = False,
    **kwargs,
):
    """Chat in the terminal: replies stream as they come; /help lists the commands."""
    from .. import chat as chat_lib

    load = pick(kwargs, load_options)
    path = model_path(load.pop("model"))
    with chat_lib.loading(path):
        model, tokenizer = load_model(str(path), **load)
    session = chat_lib.ChatSession(model, tokenizer, system=system,
                                   **pick(kwargs, sampling_options))
    chat_lib.repl(session, quiet=quiet)


@app.command()
@friendly
@pipelined
@options(sampling_options, load_options)
def batch(
    input: Annotated[Path, typer.Argument(help="JSONL file: one {\"id\", \"prompt\", options...} per line.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL results; a rerun skips the ids it holds.")],
    raw: RawOpt = False,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="Run again the ids whose record in --out is an error (the new record is appended).")] = False,
    as_json: JsonOpt = False,
    **kwargs,
):
    """Generate for every prompt of a JSONL file with one model load; resumable."""
    from .. import batch as batch_lib

    plan = batch_lib.prepare(input, out, retry_errors=retry_errors)
    if plan.pending:
        if plan.done:
            say(f"resuming: {plan.done} of {len(plan.jobs)} already in {out}")
        model, tokenizer = load_model(**pick(kwargs, load_options), progress=not as_json)
        try:
            summary = batch_lib.run(model, tokenizer, plan, pick(kwargs, sampling_options),
                                    progress=not as_json, raw=raw)
        except KeyboardInterrupt:
            say(f"interrupted; {out} holds whole records only: rerun the same command to finish")
            raise typer.Exit(130) from None
        errors = f"{summary['errors']} error{'' if summary['errors'] == 1 else 's'}"
        note = f"wrote {summary['written']} records ({errors}) to {out}"
    else:
        summary = batch_lib.run(None, None, plan, progress=False)
        note = f"nothing to do: {out} holds all {len(plan.jobs)} records"
    typer.echo(json.dumps(summary) if as_json else note, err=not as_json)


@app.command()
@friendly
@pipelined
@options(load_options, drop=("max_context",))
def perplexity(
    data: Annotated[Path, typer.Option("--data", help="Text file to score.")],
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="Tokens per scoring window (each starts fresh).")] = 256,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=2, help="Score at most this many tokens.")] = None,
    as_json: JsonOpt = False,
    **kwargs,
):
    """Perplexity of a model over a text file, in fixed windows: does sparsity cost quality?"""
    from ..perplexity import perplexity as run
    from ..state import state_of, stats_line

    model, tokenizer = load_model(**pick(kwargs, load_options), max_context=seq_len,
                                  progress=not as_json)
    state = state_of(model)
    result = run(model, tokenizer, data, seq_len=seq_len, max_tokens=max_tokens,
                 token_by_token=state.streaming)
    result["mode"] = state.mode
    result["stats"] = state.stats()
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens "
               f"({result.get('windows', '?')} windows of {seq_len} tokens, mode {result['mode']})")
    if state.streaming:
        say(stats_line({**result["stats"], "generation_tokens": result["tokens"],
                        "tokens_per_s": result["tokens_per_s"], "mode": result["mode"]},
                       detail=True))
