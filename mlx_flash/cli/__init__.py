"""The `mlx-flash` command: a thin Typer layer; each command calls one library function.

`options.py` holds the option types and groups the commands share; the commands live by theme in
`run.py` (generate, chat, batch, perplexity), `dirs.py` (convert, info, verify, calibrate) and
`measure.py` (probe, bench).
"""

from __future__ import annotations

import typer

from .. import __version__

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlx-flash {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
):
    """Run language models larger than memory: FFN neurons streamed from flash (LLM in a flash)."""


from . import dirs, measure, run, serve  # noqa: E402, F401  (the commands register on `app`)


def main():
    app()
