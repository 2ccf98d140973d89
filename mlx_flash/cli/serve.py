"""The command that serves a model over HTTP: serve."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import FlashError
from . import app
from . import options as opt
from .ranks import pipelined


@app.command()
@opt.friendly
@pipelined
@opt.options(opt.load_options, opt.sampling_options, drop=("stop", "seed"), max_tokens=256)
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. The default is loopback only; any other address is reachable from other machines (a warning says so).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on; 0 picks a free one.")] = 8080,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="MLX_FLASH_API_KEY", help="Require this key on every request but /health (`Authorization: Bearer KEY` or `x-api-key: KEY`); a wrong one gets 401. Default: none.")] = None,
    prompt_caches: Annotated[int, typer.Option("--prompt-caches", min=1, max=64, help="KV caches kept between requests: a prompt that starts with one's tokens prefills only the rest. Each is one --max-context of KV cache, reserved inside --memory.")] = 1,
    **kwargs,
):
    """Serve the model over OpenAI's and Anthropic's HTTP APIs.

    Endpoints: /v1/chat/completions, /v1/completions, /v1/messages (Anthropic), /v1/models,
    /health. Tool calls are parsed with mlx-lm's parser for the model's family; reasoning comes
    apart (`reasoning_content`, thinking blocks). One request at a time, in arrival order,
    within the memory budget; each response carries the flash figures of its generation
    (`x_flash`) and how many prompt tokens came from a kept cache. --max-tokens, --temp,
    --top-p and --repetition-penalty are the defaults of requests that do not set them.
    Ctrl-C stops."""
    from .. import serve as lib

    if api_key is not None and not api_key.strip():
        raise FlashError("--api-key is empty")
    load = opt.pick(kwargs, opt.load_options)
    path = opt.model_path(load.pop("model"))
    model, tokenizer = opt.load_model(str(path), kv_caches=prompt_caches, **load)
    lib.serve(model, tokenizer, name=path.name, host=host, port=port,
              defaults=opt.pick(kwargs, opt.sampling_options), on_ready=opt.say, log=opt.say,
              api_key=api_key, prompt_caches=prompt_caches)
    opt.say("server stopped")
