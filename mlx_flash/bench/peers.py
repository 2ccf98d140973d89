"""The peers `mlx-flash bench --peers` runs beside our strategies, on the same weights, prompt,
greedy tokens and memory limit: mlx-lm (the dense ceiling), mlx-vlm (its MoE expert offload)
and llama.cpp (llama-cpp-python on a GGUF of the same model).

Peers are never dependencies of ours: each but mlx-lm (ours already) lives in a venv of its own
under `models/bench/peers/<peer>/` ($MLX_FLASH_PEERS), made on first use or by
`mlx-flash bench --install-peers`. A peer runs as `peer_run.py` with that venv's python (it
imports only the peer's package and the standard library), in a memory group of its own whose
limit it sets as our workers do: its measured base RSS + the budget + LIMIT_SLACK of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import venv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import platform
from ..errors import FlashError

RUNNER = Path(__file__).with_name("peer_run.py")
MARKER = "mlx-flash-peer.json"  # written into a peer's venv once its install imported
ROUTING_SLACK = 8  # planted routing rows beyond prompt + tokens: peers compute a step ahead


@dataclass(frozen=True)
class Peer:
    name: str
    module: str  # what the runner imports
    packages: tuple[str, ...] = ()  # pip requirements of its venv; () = our own interpreter
    build_env: dict = field(default_factory=dict)  # environment of its pip install
    auto_install: bool = True  # made on first use (False: a long build, only on request)
    gguf: bool = False  # runs a llama.cpp GGUF, not the MLX dir (its tokens are not compared)
    note: str = ""


def _mlx_pin() -> str:
    """The MLX of our venv, for the peer's (the same kernels: the same greedy tokens)."""
    from importlib.metadata import version

    extra = "[cpu]" if platform.IS_LINUX else ""  # Linux's mlx needs a backend package
    return f"mlx{extra}=={version('mlx')}"


PEERS = {
    "mlx-lm": Peer("mlx-lm", "mlx_lm", note="mlx-lm's own load and generate_step: every "
                   "weight in memory (the dense ceiling; under a limit it may be killed)"),
    "mlx-vlm": Peer("mlx-vlm", "mlx_vlm", ("mlx-vlm==0.7.10",),
                    note="mlx_vlm.moe_offload: the experts repacked once into a per-expert "
                    "store, an LRU of them within the budget"),
    "llama.cpp": Peer("llama.cpp", "llama_cpp", ("llama-cpp-python==0.3.36",),
                      # the native build crashed in decode on the CPUs tried (measure_llamacpp)
                      build_env={"CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_AVX512=OFF "
                                 "-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_OPENMP=OFF"}
                      if platform.IS_LINUX else {},
                      auto_install=False, gguf=True,
                      note="llama-cpp-python built from source (~25 min on 2 cores); mmap"),
}


def parse_peers(spec: str | list[str] | None) -> list[str]:
    """Peer names from a comma list; an unknown name is a FlashError naming the known ones."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in (s.strip() for s in items if s.strip()):
        if item not in PEERS:
            raise FlashError(f"unknown peer {item!r}; choose from {', '.join(PEERS)}")
        if item not in out:
            out.append(item)
    return out


def peers_home() -> Path:
    return Path(os.environ.get("MLX_FLASH_PEERS", "models/bench/peers"))


def peer_dir(name: str) -> Path:
    return peers_home() / name


def python_of(name: str) -> Path:
    """The interpreter a peer runs in (ours for mlx-lm)."""
    if not PEERS[name].packages:
        return Path(sys.executable)
    return peer_dir(name) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def installed(name: str) -> bool:
    return not PEERS[name].packages or (
        (peer_dir(name) / MARKER).is_file() and python_of(name).is_file())


def not_installed_reason(name: str) -> str:
    return (f"run `mlx-flash bench --install-peers {name}`"
            + (" (builds llama-cpp-python from source, ~25 min on 2 cores)"
               if name == "llama.cpp" else ""))


def install(name: str, progress: Callable[[str], None] | None = None) -> Path:
    """Make (or remake) the peer's venv under `peers_home()` and pip-install its packages;
    returns the venv. FlashError with pip's last lines when the install fails."""
    say = progress or (lambda _: None)
    peer = PEERS[name]
    if not peer.packages:
        say(f"{name}: runs in mlx-flash's own environment (nothing to install)")
        return Path(sys.prefix)
    where = peer_dir(name)
    (where / MARKER).unlink(missing_ok=True)
    say(f"{name}: making the venv {where}")
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    packages = [*peer.packages] + ([_mlx_pin()] if peer.module.startswith("mlx") else [])
    cmd = [str(python_of(name)), "-m", "pip", "install", "--no-input", *packages]
    say(f"{name}: {' '.join(cmd[1:])}")
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **peer.build_env})
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-15:]
        say(f"{name}: {line.rstrip()}")
    if proc.wait() != 0:
        raise FlashError(f"installing {name} into {where} failed: " + " | ".join(tail[-4:]))
    check = subprocess.run([str(python_of(name)), "-c", f"import {peer.module}"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise FlashError(f"{name} installed into {where} but `import {peer.module}` fails: "
                         + (check.stderr.strip().splitlines() or ["?"])[-1])
    versions = subprocess.run([str(python_of(name)), "-m", "pip", "freeze"],
                              capture_output=True, text=True).stdout.split()
    (where / MARKER).write_text(json.dumps({"peer": name, "packages": versions}, indent=1))
    say(f"{name}: installed in {where}")
    return where


def planted_routing(path: Path, config: dict, rows: int) -> dict | None:
    """A synthetic MoE's planted routing (bench/routing.py) drawn for `rows` rows per layer,
    for the peers to replay (peer_run.py): the same experts our strategies see, so the same
    tokens; None for a model without it."""
    import mlx.core as mx
    import numpy as np

    from ..direct import _top_k, expert_count
    from .routing import load_routing

    text = config.get("text_config") or config
    experts = expert_count(config)
    if experts is None:
        return None
    routers = load_routing(path, experts, _top_k(config), text["num_hidden_layers"])
    if routers is None:
        return None
    layers = [[np.flatnonzero(row > 0).tolist()
               for row in np.array(r(mx.zeros((rows + ROUTING_SLACK, 1))))] for r in routers]
    return {"experts": experts, "layers": layers}


def _fingerprint(path: Path) -> str:
    """A dir's weights by name, size and modification time: a repack made of other weights is
    not reused."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _row(name: str, status: str, reason: str) -> dict:
    return {"strategy": name, "system": name, "status": status, "reason": reason}


def _model_dir(name: str, path: Path, zero_copy: bool, ckpt: Path | None):
    """(the dir the peer loads, or None, and why not)."""
    from ..direct import streamable

    if name == "mlx-lm":  # mlx-lm loads an mlx-lm dir or the dense HF checkpoint
        return (path, None) if zero_copy else (ckpt, None) if ckpt else (
            None, "no dense checkpoint of the same weights (pass --checkpoint)")
    for cand in (path if zero_copy else None, ckpt):
        if cand is not None and streamable(cand):
            return cand, None
    return None, "its expert offload needs an mlx-lm MoE dir (stacked switch_mlp experts)"


def unready(name: str, say: Callable[[str], None]) -> dict | None:
    """None where the peer can run, made on first use where its install is quick (pip wheels);
    else its row at every budget: not installed (a long build, only on request) or failed."""
    if installed(name):
        return None
    if not PEERS[name].auto_install:
        return _row(name, "not installed", not_installed_reason(name))
    try:
        install(name, say)
    except FlashError as e:
        return _row(name, "failed", f"install: {e}")
    return None


def run_peer(name: str, *, path: Path, zero_copy: bool, ckpt: Path | None, budget,
             limited: bool, parent: Path | None, prompt: str, prompt_ids: list[int],
             tokens: int, max_context: int, routing: dict | None, gguf: str | Path | None,
             say: Callable[[str], None]) -> dict:
    """One installed peer's row at one budget: run cold in a memory group of its own (limited
    to its base RSS + `budget.total` + LIMIT_SLACK where `limited`); a peer that cannot run
    this model or fails is a row saying so."""
    from .driver import LIMIT_SLACK, _group_figures, _memory_group, _spawn

    peer = PEERS[name]
    spec = dict(peer=name, prompt=prompt, prompt_ids=prompt_ids, tokens=tokens,
                max_context=max_context, budget_bytes=budget.total if limited else None,
                limit_slack=LIMIT_SLACK, threads=None)
    if peer.gguf:
        if gguf is None:
            return _row(name, "skipped", "needs --gguf FILE: the same model as a llama.cpp GGUF")
        spec.update(gguf=str(gguf), evict=[str(gguf)])
    else:
        from ..direct import weight_files

        model, why = _model_dir(name, path, zero_copy, ckpt)
        if model is None:
            return _row(name, "skipped", why)
        spec.update(model=str(model), routing=routing,
                    evict=[str(f) for f in weight_files(model)] or
                    [str(f) for f in model.glob("*.safetensors")])
    if name == "mlx-vlm":
        source = Path(spec["model"])
        offload = peer_dir(name) / "offload" / f"{source.name}-{_fingerprint(source)}"
        if not (offload / "offload_index.json").is_file():
            say(f"mlx-vlm: repacking {spec['model']} into {offload} (once: a second copy of "
                "its experts, one file per layer)")
            done = _spawn(dict(peer=name, repack=True, model=spec["model"], offload=str(offload)),
                          say, [str(python_of(name)), str(RUNNER)])
            if "offload" not in done:
                return _row(name, "failed", f"repack: {done.get('reason')}")
        # what the budget leaves for experts once the resident weights and KV cache are in
        left = budget.total - budget.resident - budget.kv_cache
        spec.update(offload=str(offload), evict=[str(f) for f in offload.rglob("*.safetensors")],
                    expert_cache_bytes=max(1, left) if limited else 2 * budget.model)
    with _memory_group(parent, f"peer-{name}") as group:
        spec["cgroup"] = str(group) if group else None
        row = _spawn(spec, say, [str(python_of(name)), str(RUNNER)])
        _group_figures(row, group)
    row.update(system=name, tokens_compared=not peer.gguf)
    if name == "mlx-vlm":
        row["offload_dir"] = spec["offload"]
    return row


def install_peers(spec: str | list[str], progress: Callable[[str], None] | None = None
                  ) -> dict[str, Path]:
    """Install (or reinstall) the peers of the comma list `spec`; their venvs by name."""
    return {name: install(name, progress) for name in parse_peers(spec)}
