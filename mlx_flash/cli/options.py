"""What the commands share: option types, option groups, the error wrapper, model loading."""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Annotated

import typer

from ..errors import FlashError

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="A flash dir, an HF checkpoint dir, a llama.cpp .gguf "
                 "file or a Hub repo id (the last two converted once into models/<name>-flash). "
                 "Default: $MLX_FLASH_MODEL, else models/SmolLM2-135M-Instruct-flash once "
                 "`make demo` made it, else the embedded demo model."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
MemoryOpt = Annotated[
    str | None,
    typer.Option("--memory", help="Budget for the model's part of the process: resident "
                 "weights, KV cache, neuron or expert caches, read buffers, predictors and the "
                 "working memory of computing (a prefill step's activations, MLX's cache of freed "
                 "buffers); not Python, the libraries or the tokenizer, loaded first (their RSS "
                 "is `base_rss_bytes` in --json). Bytes with a unit (8GB, 512MiB, 100B), a "
                 "fraction of RAM (0.25 or 25%) or of the model (50%model). Flash dirs only. "
                 "Default: half the RAM."),
]
ModeOpt = Annotated[
    str,
    typer.Option("--mode", help="auto (dense if the budget holds the model, else sketch or "
                 "predicted where the dir has one, else oracle), dense, naive (the whole FFN "
                 "read per token), hybrid (the budget's share of each layer resident, the rest "
                 "read per token), oracle (the exact active neurons: a correctness reference), "
                 "predicted (the calibrated predictors) or sketch (`mlx-flash sketch`: each "
                 "token's top share of a gated FFN's neurons). "
                 "A mixture of experts runs routed (auto, oracle, predicted: the router's "
                 "experts through the expert cache) or naive (every routed expert read)."),
]
WindowOpt = Annotated[
    int | None,
    typer.Option("--window", min=1, help="Keep the neurons of the last W tokens cached. "
                 "Default 4."),
]
MaxContextOpt = Annotated[
    int | None,
    typer.Option("--max-context", min=16, help="Tokens of context (prompt and reply) the KV "
                 "cache holds; a flash dir's budget reserves it. Default: the model's limit, at "
                 "most 2048."),
]
ComputeOpt = Annotated[
    str | None,
    typer.Option("--compute", help="Quantized flash dirs: quantized (cached neurons stay "
                 "quantized; MLX's quantized kernels, fast on a GPU) or dequantized (dequantized "
                 "as they are read into a float cache: 4x its memory, fast on a CPU). Default: "
                 "by device."),
]
LookaheadOpt = Annotated[
    bool | None,
    typer.Option("--lookahead/--no-lookahead", help="Read what the next layer is guessed to need "
                 "while this one computes. Default: on for a mixture of experts, off for a dense "
                 "FFN (on a 2-core machine the extra reads and predictor pass did not pay; see "
                 "docs/BENCHMARKS.md)."),
]
LayersSplitOpt = Annotated[
    str | None,
    typer.Option("--layers-split", help="Under `mlx.launch -n N`: layers per rank, a comma "
                 "list (14,18) in order from rank 0. Default: split by bytes (docs/DISTRIBUTED.md)."),
]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate.")]


def _positive(value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise typer.BadParameter("must be > 0 (1 is no penalty)")
    return value


def load_options(model: ModelOpt = None, memory: MemoryOpt = None, mode: ModeOpt = "auto",
                 window: WindowOpt = None, max_context: MaxContextOpt = None,
                 compute: ComputeOpt = None, lookahead: LookaheadOpt = None,
                 layers_split: LayersSplitOpt = None):
    """The options that say which model to load and how (a group: see `options`)."""


def sampling_options(
    max_tokens: MaxTokensOpt = 100,
    temp: Annotated[float, typer.Option("--temp", min=0.0, help="Sampling temperature; 0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling: keep the smallest set of tokens with this probability mass (0 or 1: off).")] = 0.0,
    repetition_penalty: Annotated[float | None, typer.Option("--repetition-penalty", callback=_positive, help="Penalize tokens of the last 20 (> 1 discourages repeats). Default: none.")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop at this text (not printed); repeat for several.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")] = None,
):
    """The options of sampling a reply (a group: see `options`)."""


def options(*groups, drop: tuple[str, ...] = (), **defaults):
    """Give a command the options of `groups` after its own: they arrive in its `**kwargs`.
    `drop` leaves some out; `defaults` changes a group option's default for this command."""

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        shared = [p.replace(default=defaults.get(p.name, p.default))
                  for g in groups for p in inspect.signature(g, eval_str=True).parameters.values()
                  if p.name not in drop]
        fn.__signature__ = sig.replace(parameters=own + shared)
        return fn

    return decorate


def pick(kwargs: dict, group) -> dict:
    """The entries of `kwargs` that are options of `group`."""
    names = inspect.signature(group).parameters
    return {k: v for k, v in kwargs.items() if k in names}


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


def say(line: str) -> None:
    typer.echo(line, err=True)


def model_path(model: str | None, progress: bool = True) -> Path:
    """The model dir for `--model`: the default model, a local dir, or a GGUF file or Hub repo
    id converted once into `models/<name>-flash` (reused when it is there); a Hub repo of an
    mlx-lm MoE dir is its snapshot, streamed as it is (direct.py)."""
    from ..generation import default_model
    from ..gguf import is_gguf

    if model is None:
        return default_model()
    path = Path(model).expanduser()
    if path.exists() and not is_gguf(path):
        return path
    from .. import hub
    from ..convert import convert, default_out

    if not is_gguf(path) and not hub.is_repo_id(model):
        raise FlashError(f"{model}: no such directory (and not a Hub repo id like owner/name)")
    out = default_out(model)
    if (out / "manifest.json").is_file():
        return out
    if not is_gguf(path):
        from ..direct import streamable

        local = hub.resolve(model, progress=progress)
        if streamable(local):  # an mlx-lm MoE dir: its experts read from the snapshot
            return local
    say(f"converting {model} into {out} (once)")
    convert(model, out=out, progress=progress)
    return out


def load_model(model: str | None = None, memory=None, mode: str = "auto", window=None,
               max_context=None, progress: bool = True, compute: str | None = None,
               lookahead: bool | None = None, layers_split: str | None = None,
               kv_caches: int = 1):
    """(model, tokenizer) for the load options, with a note when the budget changes the plan.
    Under `mlx.launch -n N` (rank 0: see ranks.py), this rank's layers of a pipeline."""
    from .. import distributed
    from ..api import load
    from ..memory import budget_note
    from ..state import state_of

    group = distributed.launched()
    if group is None and layers_split is not None:
        raise FlashError("--layers-split splits the layers between the processes of "
                         "`mlx.launch -n N`; this is a single process")
    path = model_path(model, progress)
    extra = {k: v for k, v in (("compute", compute), ("lookahead", lookahead)) if v is not None}
    if kv_caches > 1:  # a server's kept prompt caches, each a context inside the budget
        extra["kv_caches"] = kv_caches
    if group is not None:
        m, tok = distributed.load(path, group, layers_split, memory=memory, mode=mode,
                                  window=window, max_context=max_context, **extra)
    else:
        m, tok = load(path, memory=memory, mode=mode, window=window, max_context=max_context,
                      **extra)
    loaded = state_of(m)
    if loaded.budget is not None and (note := budget_note(loaded.budget.total)):
        say(note)
    if loaded.mode == "dense" and memory is not None and mode == "auto":
        say("note: the whole model fits the memory budget; loaded densely")
    if mode == "dense" and memory is not None and loaded.budget is not None:
        say("note: --mode dense holds every weight in memory; the --memory budget is not applied")
    if loaded.note is not None:
        say(loaded.note)
    elif mode in ("auto", "predicted") and loaded.mode == "oracle":
        if loaded.runtime is None or loaded.runtime.exact_sparse:  # ReLU: predictors pay
            say("note: no predictors in this model dir; the exact oracle picks the neurons "
                "(run `mlx-flash calibrate`)")
        else:  # a gated FFN has no exact zeros; a sketch is named where one would pay
            say("note: every neuron is computed (the exact path: a gated FFN has no inactive "
                "neurons to skip, and at this budget no sketch is expected to read less)")
    return m, tok


def read_prompt(prompt: str) -> str:
    """`--prompt` text, `-` for stdin; refuses text that is not valid UTF-8 or is empty."""
    import sys

    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FlashError(f"the prompt on stdin is not UTF-8 text (byte {data[e.start]:#04x} "
                             f"at offset {e.start})") from None
    else:
        try:  # arguments that are not UTF-8 arrive as lone surrogates
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise FlashError(f"the prompt is not UTF-8 text (a bad byte at character "
                             f"{e.start})") from None
    if not prompt:
        raise FlashError("the prompt is empty")
    return prompt
