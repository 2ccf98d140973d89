"""The memory budget: parse `--memory` and split it into resident, KV cache, buffers and caches."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from . import platform
from .errors import FlashError
from .format import Manifest

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
# Prefill and naive mode stream whole layers through one buffer of at most this size.
STREAM_CHUNK_BYTES = 4 << 20


def parse_memory(spec: str | float | int | None, model_bytes: int) -> int:
    """Bytes from `8GB`/`512MiB`/`123456`, a RAM fraction (`0.25`, `25%`) or `50%model`."""
    if spec is None:
        spec = "0.5"
    text = str(spec).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%model", text)
    if m:
        return int(float(m.group(1)) / 100 * model_bytes)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", text)
    if m:
        return int(float(m.group(1)) / 100 * platform.physical_memory_bytes())
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", text)
    if m and m.group(2) in _UNITS:
        value, unit = float(m.group(1)), m.group(2)
        if unit == "" and ("." in m.group(1) or value <= 1):  # a fraction of RAM
            if not 0 < value <= 1:
                raise FlashError(f"--memory {spec}: a fraction of RAM must lie in (0, 1]")
            return int(value * platform.physical_memory_bytes())
        return int(value * _UNITS[unit])
    raise FlashError(
        f"--memory {spec!r} not understood; use bytes (8GB, 512MiB), a fraction of RAM (0.25) "
        "or of the model (50%model)"
    )


def stream_rows(manifest: Manifest) -> int:
    """Records per chunk when a whole layer streams through (prefill, naive): at most
    STREAM_CHUNK_BYTES and at most a quarter of a layer, so small models keep small buffers."""
    rows = min(STREAM_CHUNK_BYTES // manifest.record_bytes, -(-manifest.ffn_dim // 4))
    return max(1, rows)


def _kv_bytes(config: dict, manifest: Manifest, max_context: int) -> int:
    heads = config.get("num_attention_heads", 1)
    head_dim = config.get("head_dim") or manifest.d_model // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return 2 * manifest.num_layers * max_context * kv_heads * head_dim * manifest.itemsize


@dataclass
class Budget:
    """How a memory budget is spent; all figures in bytes except `capacity` (rows per layer)."""

    total: int
    model: int  # resident + dense FFN weights
    resident: int
    kv_cache: int
    buffers: int
    dense_ffn: int
    record_bytes: int
    num_layers: int
    ffn_dim: int
    max_context: int
    other: int = 0  # predictors

    @property
    def fits_dense(self) -> bool:
        return self.total >= self.resident + self.kv_cache + self.dense_ffn

    @property
    def capacity(self) -> int:
        free = self.total - self.resident - self.kv_cache - self.buffers - self.other
        return max(0, min(self.ffn_dim, free // (self.num_layers * self.record_bytes)))

    @property
    def neuron_cache(self) -> int:
        return self.capacity * self.num_layers * self.record_bytes

    def require_flash(self) -> None:
        if self.capacity < 1:
            need = (self.resident + self.kv_cache + self.buffers + self.other
                    + self.num_layers * self.record_bytes)
            raise FlashError(
                f"memory budget {_fmt(self.total)} is too small: resident weights need "
                f"{_fmt(self.resident)}, the KV cache for {self.max_context} tokens "
                f"{_fmt(self.kv_cache)}, read buffers {_fmt(self.buffers)}, predictors "
                f"{_fmt(self.other)}; give at least "
                f"{_fmt(need)} (more for a useful neuron cache)"
            )

    def as_dict(self, mode: str) -> dict:
        out = asdict(self)
        out.update(mode=mode, capacity=self.capacity, neuron_cache=self.neuron_cache,
                   capacity_fraction=round(self.capacity / self.ffn_dim, 4))
        return out


def _fmt(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def plan_budget(manifest: Manifest, config: dict, memory, max_context: int) -> Budget:
    dense_ffn = manifest.num_layers * manifest.ffn_dim * manifest.payload_bytes
    model = manifest.resident_bytes + dense_ffn
    buffers = stream_rows(manifest) * manifest.record_bytes
    return Budget(
        total=parse_memory(memory, model), model=model, resident=manifest.resident_bytes,
        kv_cache=_kv_bytes(config, manifest, max_context), buffers=buffers,
        dense_ffn=dense_ffn, record_bytes=manifest.record_bytes,
        num_layers=manifest.num_layers, ffn_dim=manifest.ffn_dim, max_context=max_context,
    )
