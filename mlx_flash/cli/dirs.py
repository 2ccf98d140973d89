"""Commands that make or describe a flash dir: convert, info, verify, calibrate, sketch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import FlashError
from ..units import format_bytes
from . import app
from .options import JsonOpt, friendly


@app.command()
@friendly
def convert(
    source: Annotated[str, typer.Argument(help="Local HF checkpoint dir (float or mlx-lm quantized), Hub repo id (owner/name) or llama.cpp .gguf file.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output dir. Default models/<name>-flash (<stem>-flash for a .gguf file).")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="float16, bfloat16 or float32 (of values, or of a quantized model's scales). Default: as stored.")] = None,
    quantize: Annotated[str | None, typer.Option("--quantize", "-q", help="4 or 8: quantize FFN records and resident layers (MLX affine, as mlx-lm does); none: float records. Default: as the source (a quantized mlx-lm dir or GGUF file keeps its bits).")] = None,
    group_size: Annotated[int | None, typer.Option("--group-size", help="Values per scale with --quantize: 32, 64 or 128. Default 64, or the source's.")] = None,
    layout: Annotated[str, typer.Option("--layout", help="auto, packed (records back to back; reads take whole blocks) or aligned (each record starts on a block). auto: aligned unless that pads records by more than 12.5%.")] = "auto",
    align: Annotated[int | None, typer.Option("--align", help="Block size in bytes, a power of two from 4096. Default: the direct-I/O block (16384 on macOS, 4096 on Linux).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing flash dir.")] = False,
    as_json: JsonOpt = False,
):
    """Convert a checkpoint (local HF dir, mlx-lm quantized dir, Hub repo id or .gguf file) into a flash model dir (bundled FFN neurons)."""
    from .. import format as fmt
    from ..convert import convert as run
    from ..errors import FlashError

    bits = {None: None, "none": 0, "0": 0, "4": 4, "8": 8}
    if quantize not in bits:
        raise FlashError(f"--quantize {quantize}: choose 4, 8 or none")
    layouts = {"auto": None, "packed": True, "aligned": False}
    if layout not in layouts:
        raise FlashError(f"--layout {layout}: choose auto, packed or aligned")
    path = run(source, out=out, dtype=dtype, align=align, force=force, progress=not as_json,
               quantize=bits[quantize], group_size=group_size, packed=layouts[layout])
    if not fmt.is_flash_dir(path):  # an MoE only mlx-lm knows: its dir, streamed as it is
        if as_json:
            typer.echo(json.dumps({"path": str(path), "layout": "mlx-lm"}))
        else:
            typer.echo(f"wrote {path} (mlx-lm's layout: its experts stream from it as it is)")
    elif as_json:
        typer.echo(json.dumps(fmt.info(path)))
    else:
        typer.echo(f"wrote {path}")


FlashDirArg = Annotated[Path, typer.Argument(help="A flash model dir.")]


@app.command()
@friendly
def info(path: FlashDirArg, as_json: JsonOpt = False):
    """Describe a flash model dir: architecture, dims, dtype, sizes and padding, alignment,
    format version, whether it is calibrated and when it was last verified (an mlx-lm MoE dir:
    what streams from it)."""
    from .. import direct
    from .. import format as fmt

    data = direct.info(path) if not fmt.is_flash_dir(path) and direct.streamable(path) else (
        fmt.info(path))
    width = max(len(k) for k in data)
    lines = [f"{k:<{width}}  " + (f"{v} ({format_bytes(v)})" if isinstance(v, int)
                                  and k.endswith("bytes") and v >= 2**20 else f"{v}")
             for k, v in data.items()]
    typer.echo(json.dumps(data) if as_json else "\n".join(lines))


@app.command()
@friendly
def verify(path: FlashDirArg, as_json: JsonOpt = False):
    """Check every byte of a flash dir against the checksums written with it."""
    from ..verify import verify as run

    r = run(path, progress=not as_json)
    typer.echo(json.dumps(r) if as_json else f"ok: {r['parts']} parts, "
               f"{format_bytes(r['bytes'])} checked in {r['seconds']} s")


@app.command()
@friendly
def calibrate(
    path: Annotated[Path, typer.Argument(help="A flash model dir (from `mlx-flash convert`).")],
    data: Annotated[list[Path], typer.Option("--data", help="Calibration text file (training-like text); repeat it for a mix (an equal share of tokens from each, in turn).")],
    tokens: Annotated[int, typer.Option("--tokens", min=512, help="Calibration tokens.")] = 200_000,
    rank: Annotated[int | None, typer.Option("--rank", min=1, help="One predictor rank for every layer.")] = None,
    ranks: Annotated[str | None, typer.Option("--ranks", help="Per-layer ranks: comma list, one per layer.")] = None,
    target_recall: Annotated[float, typer.Option("--target-recall", "--recall", min=0.5, max=1.0, help="Recall the thresholds aim at on held-out tokens (of the calibration text and of the --holdout text).")] = 0.95,
    sparsity: Annotated[float | None, typer.Option("--sparsity", min=0.0, max=0.99, help="Non-ReLU models: fraction of |act(gate)*up| treated as inactive (default 0.5).")] = None,
    holdout: Annotated[str, typer.Option("--holdout", help="A second text unlike --data: half of it sets the thresholds too, so the recall holds beyond the calibration text, and the other half is scored (shown here and by `info`). Default: the general-English text shipped with mlx-flash (Wikipedia articles); none: no second text.")] = "default",
    holdout_tokens: Annotated[int, typer.Option("--holdout-tokens", min=128, help="Tokens of the --holdout text.")] = 4096,
    as_json: JsonOpt = False,
):
    """Train the low-rank activation predictors of a flash dir, layer by layer."""
    from ..calibrate import calibrate as run

    if rank is not None and ranks is not None:
        raise FlashError("give --rank or --ranks, not both")
    second = None if holdout == "none" else holdout
    report = run(path, data if len(data) > 1 else data[0], tokens=tokens,
                 ranks=rank if rank is not None else ranks, target_recall=target_recall,
                 sparsity=sparsity, progress=not as_json, holdout=second,
                 holdout_tokens=holdout_tokens)
    if as_json:
        typer.echo(json.dumps(report))
        return
    second = report.get("holdout")
    cal = report["calibration"]
    typer.echo(f"held out: {cal['heldout_tokens']} tokens of {cal['data']}"
               + (f"; {second['tokens']} tokens of {second['data']}" if second else ""))
    typer.echo("layer  rank  true sparsity  predicted active  recall  precision"
               + ("  | second text: predicted active  recall" if second else ""))
    for i, row in enumerate(report["layers"]):
        line = (f"{i:>5}  {row.get('rank', ''):>4}  {row['true_sparsity']:>13.3f}  "
                f"{row['predicted_active_fraction']:>16.3f}  {row['recall']:>6.3f}  "
                f"{row['precision']:>9.3f}")
        if second:
            out = second["layers"][i]
            line += f"  | {out['predicted_active_fraction']:>29.3f}  {out['recall']:>6.3f}"
        typer.echo(line)
    typer.echo(f"wrote {Path(path) / 'predictors.safetensors'}")


@app.command()
@friendly
def sketch(
    path: FlashDirArg,
    bits: Annotated[int | None, typer.Option("--bits", help="Bits per weight of the sketch: 2, 3, 4 or 8 (MLX affine groups of 64 along d_model). 8: the sketch's act(gate)*up is also each chosen neuron's value, and only its down row is read and cached (float records). Default: an existing sketch's kind; else, for a quantized dir without FFN biases, no copy: its own gate/up rows stay resident as the values; else 8 for float records without biases, else 4. Where a down row is smaller than a block, values mode also writes down.bin: the down rows again, a layer's one after another (a third of the FFN on disk).")] = None,
    keep: Annotated[float, typer.Option("--keep", min=0.01, max=1.0, help="Share of each layer's neurons a token computes (its top ones by the sketch's |act(gate)*up|). Only this is rewritten when a sketch of these bits exists.")] = 0.6,
    own: Annotated[bool, typer.Option("--own", help="Quantized dirs without FFN biases: their own gate/up rows stay resident as the values (no copy; the default where the dir has no sketch yet). Back to them after a --bits sketch.")] = False,
    as_json: JsonOpt = False,
):
    """Write the low-bit sketch of a gated FFN's gate/up rows: the predictor of models whose
    every neuron is active (SiLU/GELU). Per token it ranks the neurons and only the top --keep
    share is read and computed exactly (4-bit), or, 8-bit, its own act(gate)*up is their value
    and only their down rows are read: a third of each record (from down.bin, a copy of the
    down rows, where they are smaller than a block). A quantized dir's own gate/up rows are
    its values sketch: they stay resident and only down rows are read. No data or training; it
    stays in memory (4-bit: 19% of the FFN's float16 bytes, 8-bit: 35%; a quantized dir's own
    rows: 2/3 of its FFN), and `auto` runs it where the --memory budget has room and it is
    expected to read less."""
    from .. import format as fmt
    from ..sketch import VALUE_BITS, sketch_bytes, write_sketch

    r = write_sketch(path, bits=bits, keep=keep, progress=not as_json, own=own)
    m = fmt.read_manifest(path)
    r["memory_bytes"] = sketch_bytes(m)
    if as_json:
        typer.echo(json.dumps(r))
        return
    what = "wrote" if r["rewritten"] else "kept (new --keep only)"
    own = bool(r.get("own"))
    values = ", its values (down rows read)" if own or r["bits"] >= VALUE_BITS else ""
    kind = f"its own {r['bits']}-bit gate/up rows" if own else f"{r['bits']}-bit"
    typer.echo(f"{what} {r['path']}: {kind}, {format_bytes(r['memory_bytes'])} in "
               f"memory, top {r['keep']:.0%} of each layer's neurons per token{values}")
    if isinstance(down := r.get("down"), dict) and r["rewritten"]:
        typer.echo(f"wrote {m.path / down['file']}: the down rows again, a layer's one after "
                   f"another (a token's rows share blocks), {format_bytes(down['bytes'])} on disk")
    if m.packed and m.record_bytes < m.alignment and not values:
        typer.echo(f"note: this dir's {m.record_bytes}-byte records share {m.alignment}-byte "
                   "blocks, so a token's scattered choice reads most blocks and `auto` keeps "
                   "the exact path; `mlx-flash convert --layout aligned` gives each record its "
                   "own block (docs/BENCHMARKS.md)", err=True)
