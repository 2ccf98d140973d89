"""Commands that measure: probe (the disk) and bench (the paper's strategies)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from . import app
from .options import JsonOpt, WindowOpt, friendly


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
    from .. import probe as lib

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
    model: Annotated[Path | None, typer.Option("--model", "-m", help="A flash model dir (mlx-flash convert, or tools/synthetic_flash.py) or an mlx-lm MoE dir.")] = None,
    memory: Annotated[str, typer.Option("--memory", help="Memory budget, as for generate, or a comma list of budgets run one after the other (none: no limit), e.g. 30%model,50%model,70%model,none; enforced as a real limit where the platform allows.")] = "50%model",
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=1, help="Decode tokens per strategy.")] = 8,
    strategies: Annotated[str | None, typer.Option("--strategies", help="Comma list: dense, naive, hybrid, predicted, +window, +bundling, all, +lookahead (all with the next layer's reads started early), mmap, mmap-nolimit; an MoE: dense, naive, +cache, all, mmap. Default: all of them.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt text (the same for every strategy).")] = None,
    window: WindowOpt = 4,
    max_context: Annotated[int, typer.Option("--max-context", min=16, help="Tokens of KV cache the budget reserves.")] = 256,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Dense HF checkpoint of the same weights, for the dense and mmap baselines. Default: the flash dir's source.")] = None,
    peers: Annotated[str | None, typer.Option("--peers", help="Comma list of other systems run on the same weights under the same limit: mlx-lm, mlx-vlm (its MoE expert offload), llama.cpp (needs --gguf). Each in a venv of its own under models/bench/peers/ (mlx-vlm's made on first use).")] = None,
    install_peers: Annotated[str | None, typer.Option("--install-peers", help="Comma list of peers to (re)install first; alone, without --model, only installs them (llama.cpp: built from source, ~25 min).")] = None,
    gguf: Annotated[Path | None, typer.Option("--gguf", help="The same model as a llama.cpp GGUF file, for the llama.cpp peer.")] = None,
    no_limit: Annotated[bool, typer.Option("--no-limit", help="Do not enforce the budget with a memory cgroup.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw ms per token per strategy into this PNG (needs matplotlib).")] = None,
    as_json: JsonOpt = False,
):
    """Compare the paper's strategies (and other systems) on one model and prompt, each started cold."""
    from .. import bench as lib
    from ..errors import FlashError

    if model is None and not install_peers:
        raise FlashError("--model is required (or --install-peers alone to install peers)")
    for names in (peers, install_peers):  # unknown names: before any work
        lib.parse_peers(names)
    say = None if as_json else (lambda line: typer.echo(line, err=True))
    if install_peers:
        done = lib.install_peers(install_peers, progress=say)
        if model is None:
            if as_json:
                typer.echo(json.dumps({name: str(p) for name, p in done.items()}))
            return
    result = lib.bench(model, memory=memory, tokens=tokens, strategies=strategies,
                       prompt=prompt or lib.DEFAULT_PROMPT, window=window, max_context=max_context,
                       limit=not no_limit, checkpoint=checkpoint, progress=say, peers=peers,
                       gguf=gguf)
    if plot is not None:
        lib.plot(result, plot)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(lib.format_table(result))
