"""The command that serves a model over HTTP: serve."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app
from . import options as opt
from .ranks import pipelined


@app.command()
@opt.friendly
@pipelined
@opt.options(opt.load_options, opt.sampling_options, drop=("stop", "seed"), max_tokens=256)
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on (no authentication: keep it on loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on; 0 picks a free one.")] = 8080,
    **kwargs,
):
    """Serve the model over an OpenAI-compatible HTTP API.

    Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health. One request at a time, in arrival order, within the memory budget; each response carries the
    flash figures of its generation (`x_flash`). --max-tokens, --temp, --top-p and
    --repetition-penalty are the defaults of requests that do not set them. Ctrl-C stops."""
    from .. import serve as lib

    load = opt.pick(kwargs, opt.load_options)
    path = opt.model_path(load.pop("model"))
    model, tokenizer = opt.load_model(str(path), **load)
    lib.serve(model, tokenizer, name=path.name, host=host, port=port,
              defaults=opt.pick(kwargs, opt.sampling_options), on_ready=opt.say, log=opt.say)
    opt.say("server stopped")
