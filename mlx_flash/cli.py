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

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Run language models larger than memory: FFN neurons streamed from flash (LLM in a flash).",
)

# Shared option types
ModelOpt = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="Model dir: HF checkpoint or flash dir. Default: the embedded demo model."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]


def friendly(fn):
    """Known errors become one line on stderr and exit 1 (traceback with MLX_FLASH_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FlashError, OSError) as e:
            if os.environ.get("MLX_FLASH_DEBUG") == "1":
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def _root():
    """Run language models larger than memory: FFN neurons streamed from flash (LLM in a flash)."""


def _model_path(model: Path | None) -> Path:
    from .generate import DEFAULT_MODEL

    return model if model is not None else DEFAULT_MODEL


@app.command()
@friendly
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text.")],
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Tokens to generate.")] = 100,
    temp: Annotated[float, typer.Option("--temp", min=0.0, help="Sampling temperature; 0 is greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")] = None,
    as_json: JsonOpt = False,
):
    """Generate text from a prompt, streaming it as it is produced."""
    from . import generate as gen
    from .loader import load_dense

    model_obj, tokenizer = load_dense(_model_path(model))
    on_text = None if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    result = gen.generate(
        model_obj, tokenizer, prompt, max_tokens=max_tokens, temp=temp, seed=seed, on_text=on_text
    )
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo("")
        s = result["stats"]
        typer.echo(
            f"[{s.get('generation_tokens', 0)} tokens, {s.get('tokens_per_s', 0):.1f} tok/s, "
            f"peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB]",
            err=True,
        )


def main():
    app()


if __name__ == "__main__":
    main()
