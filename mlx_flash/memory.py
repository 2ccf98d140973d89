"""The memory budget: parse `--memory` and split it into resident, KV cache, buffers and caches."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from . import models, platform
from .errors import FlashError
from .format import Manifest
from .units import format_bytes

_UNITS = {
    "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
# Prefill and naive mode stream whole layers through one buffer of at most this size.
STREAM_CHUNK_BYTES = 4 << 20
NEURON_BOOKKEEPING = 16  # bytes a cached neuron costs beside its values: its id and its age
# A dequantized cache (quantized records, `--compute dequantized`) dequantizes what it inserts
# this many records at a time: MLX's CPU dequantize holds about 5.3x its output at its peak
# (measured: 22.2 MB for a (2048, 1024) bfloat16 result); the budget counts one piece of it.
DEQUANT_ROWS = 128
DEQUANT_PEAK = 6
# the most the dense lookahead's two buffers (and their reader's scratch) take (lookahead.py)
LOOKAHEAD_BYTES = 64 << 20
# A prompt is prefilled this many tokens at a time at most (mlx-lm's default is 2048), fewer
# where that step's transients (`activation_bytes`) would take more than 1/ACTIVATION_SHARE of
# the budget; they are counted in it either way.
PREFILL_TOKENS = 512
MIN_PREFILL_TOKENS = 16
ACTIVATION_SHARE = 8
# MLX keeps freed buffers for reuse up to its cache limit: the budget gives it 1/64 of itself,
# at most 32 MiB, and counts it (uncapped, it keeps the prefill's freed activations).
ALLOCATOR_CACHE_BYTES = 32 << 20
ALLOCATOR_CACHE_SHARE = 64
_FORMS = "bytes with a unit (8GB, 512MiB, 8B), a fraction of RAM (0.5, 25%) or of the model (50%model)"


def parse_memory(spec: str | float | int | None, model_bytes: int) -> int:
    """Bytes from a `--memory` spec; None means half the RAM.

    `8GB`, `512MiB`, `8B`: bytes (a unit is required); `0.25` or `25%`: a share of RAM, at most
    all of it; `50%model`: a share of the model, any size. A bare number above 1 is refused.
    """
    if spec is None:
        spec = "0.5"
    text = str(spec).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(%model|%|[a-z]*)", text)
    if not m or m.group(2) not in (*_UNITS, "", "%", "%model"):
        raise FlashError(f"--memory {spec!r} not understood; use {_FORMS}")
    number, unit = m.group(1), m.group(2)
    value = float(number)
    if unit == "%" and value > 100:
        raise FlashError(f"--memory {spec}: a share of RAM is at most 100%; for a share of the "
                         f"model write {number}%model")
    if unit == "" and value > 1:
        units = f"{number}B" if value >= 2**20 else f"{number}GB, {number}MiB"
        raise FlashError(f"--memory {spec}: a bare number is a fraction of RAM, at most 1; add a "
                         f"unit for bytes ({units}) or write a fraction like 0.5")
    if unit == "%model":
        n = int(value / 100 * model_bytes)
    elif unit in ("%", ""):
        n = int(value / (100 if unit else 1) * platform.physical_memory_bytes())
    else:
        n = int(value * _UNITS[unit])
    if n < 1:
        raise FlashError(f"--memory {spec}: the budget must be more than 0 bytes")
    return n


def budget_note(total: int) -> str | None:
    """A warning line when a budget exceeds physical RAM (allowed: swap may cover it), else None."""
    ram = platform.physical_memory_bytes()
    if total <= ram:
        return None
    return (f"note: the memory budget {format_bytes(total)} is more than this machine's RAM "
            f"({format_bytes(ram)}); expect swapping, or the process killed for memory")


def stream_rows(manifest: Manifest) -> int:
    """Records per chunk when a whole layer streams through (prefill, naive): at most
    STREAM_CHUNK_BYTES and at most a quarter of a layer, so small models keep small buffers."""
    rows = min(STREAM_CHUNK_BYTES // manifest.record_bytes, -(-manifest.ffn_dim // 4))
    if manifest.experts:  # whole experts, at least one
        rows = max(1, rows // manifest.expert_ffn) * manifest.expert_ffn
    return max(1, rows)


def lookahead_row_bytes(record_bytes: int, packed: bool) -> int:
    """Memory one row of the dense lookahead costs: a record in each of its two buffers, and for
    packed records the reader's scratch blocks as large again (storage.py)."""
    return record_bytes * (3 if packed else 2)


def activation_bytes(m: Manifest, config: dict, tokens: int, max_context: int,
                     top_k: int = 1) -> int:
    """What a prefill step of `tokens` tokens holds beside the weights, caches and buffers at its
    peak, as float32 values: per token, the hidden states (8 d), one head's row of attention
    scores per head over the context, and the FFN's products (a dense FFN's stream piece of
    gate, up and hidden; an MoE's top-k experts' inputs, products and outputs); and the last
    token's logits. Measured on MLX's CPU backend it held 0.5-0.6 of this (512 tokens: 47.6 MiB
    of the estimate's 80 for a d-1024 top-8 MoE, 15.7 of 29 for SmolLM2; docs/BENCHMARKS.md)."""
    d = m.d_model
    heads = config.get("num_attention_heads", 1)
    per_token = 8 * d + heads * max_context
    if m.experts:
        per_token += top_k * (d + 2 * m.expert_ffn)
    else:
        per_token += 3 * stream_rows(m)
    # a linear-attention layer (Gated DeltaNet; counted from its shapes, not measured): its
    # q/k/v convolution and its value-sized products per token, its recurrent state twice
    hv, dv = config.get("linear_num_value_heads", 0), config.get("linear_value_head_dim", 0)
    hk, dk = config.get("linear_num_key_heads", 0), config.get("linear_key_head_dim", 0)
    per_token += 3 * (2 * hk * dk + hv * dv) + 3 * hv * dv
    return 4 * (tokens * per_token + 3 * config.get("vocab_size", 0) + 2 * hv * dk * dv)


def kv_bytes(model, config: dict, max_context: int, itemsize: int,
             layers: range | None = None) -> int:
    """What mlx-lm's cache of `model` (`make_cache`) holds for `max_context` tokens, in `layers`
    (default all): each attention layer's keys and values (a sliding layer's at most its window
    and a prefill step: mlx-lm's RotatingKVCache keeps a step's tokens beside the window), and
    each linear-attention layer's recurrent and convolution state (fixed, whatever the
    context)."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    c = config.get("text_config") or config
    heads = c.get("num_attention_heads", 1)
    if c.get("kv_lora_rank"):  # MLA: mlx-lm caches the expanded keys and values per head
        per_token = heads * (c.get("qk_nope_head_dim", 0) + c.get("qk_rope_head_dim", 0)
                             + c.get("v_head_dim", 0)) * itemsize
    else:
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        per_token = 2 * (c.get("num_key_value_heads") or heads) * head_dim * itemsize
    hv, dv = c.get("linear_num_value_heads", 0), c.get("linear_value_head_dim", 0)
    hk, dk = c.get("linear_num_key_heads", 0), c.get("linear_key_head_dim", 0)
    conv = max(c.get("linear_conv_kernel_dim", 4) - 1, 0)
    state = 4 * hv * dv * dk + itemsize * conv * (2 * hk * dk + hv * dv)
    total = 0
    for i, cache in enumerate(make_prompt_cache(model)):
        if layers is not None and i not in layers:
            continue
        if isinstance(cache, RotatingKVCache):
            total += per_token * min(cache.max_size + PREFILL_TOKENS, max_context)
        elif isinstance(cache, KVCache):
            total += per_token * max_context
        else:
            total += state
    return total


@dataclass
class Budget:
    """How a memory budget is spent; all figures in bytes except `capacity` (rows per layer)."""

    total: int
    model: int  # resident + FFN records' payload: the model's size (`50%model`)
    resident: int
    kv_cache: int
    buffers: int
    dense_ffn: int
    neuron_bytes: int  # what one cached neuron takes: its payload (no padding), or its float size
    num_layers: int
    ffn_dim: int
    max_context: int
    kv_caches: int = 1  # contexts of KV cache reserved (kept prompt caches: promptcache.py)
    other: int = 0  # predictors
    activations: int = 0  # a prefill step's transients (`activation_bytes`)
    prefill_tokens: int = PREFILL_TOKENS  # the prompt tokens of one prefill step
    allocator_cache: int = 0  # the freed buffers MLX may keep for reuse

    @property
    def working(self) -> int:
        """What computing takes beside the weights: a prefill step's transients and MLX's cache
        of freed buffers."""
        return self.activations + self.allocator_cache

    @property
    def fits_dense(self) -> bool:
        return self.total >= self.resident + self.kv_cache + self.dense_ffn + self.working

    @property
    def free_for_cache(self) -> int:
        """What the neuron caches may take: the budget less everything else."""
        return (self.total - self.resident - self.kv_cache - self.buffers - self.other
                - self.working)

    @property
    def capacity(self) -> int:
        return self.capacity_with(0)

    def capacity_with(self, other: int) -> int:
        """The cache rows per layer if `other` more bytes were held (a sketch's)."""
        free = self.free_for_cache - other
        return max(0, min(self.ffn_dim, free // (self.num_layers * self.neuron_bytes)))

    @property
    def neuron_cache(self) -> int:
        return self.capacity * self.num_layers * self.neuron_bytes

    def plan_lookahead(self, row_bytes: int) -> int:
        """Rows of the dense lookahead's buffers (lookahead.py), each row costing `row_bytes`: at
        most a layer, LOOKAHEAD_BYTES, and half of what the neuron caches would get; counted in
        `buffers`."""
        rows = min(self.ffn_dim, LOOKAHEAD_BYTES // row_bytes,
                   max(0, self.free_for_cache) // 2 // row_bytes)
        self.buffers += rows * row_bytes
        return rows

    def fit_working(self, rows: int = 1) -> None:
        """Halve the prefill step (down to MIN_PREFILL_TOKENS) while the caches would get fewer
        than `rows` rows per layer: a tight budget prefills in smaller steps rather than fail."""
        size = getattr(self, "activation_of", None)
        while (size is not None and self.capacity < rows
               and self.prefill_tokens > MIN_PREFILL_TOKENS):
            self.prefill_tokens //= 2
            self.activations = size(self.prefill_tokens)

    def require_flash(self) -> None:
        self.fit_working()
        if self.capacity < 1:
            need = (self.resident + self.kv_cache + self.buffers + self.other + self.working
                    + self.num_layers * self.neuron_bytes)
            predictors = (f", predictors (or the oracle's input projections) "
                          f"{format_bytes(self.other)}" if self.other else "")
            raise FlashError(
                f"memory budget {format_bytes(self.total)} is too small: resident weights need "
                f"{format_bytes(self.resident)}, read buffers {format_bytes(self.buffers)}"
                f"{predictors}, computing {format_bytes(self.working)}, the KV cache "
                f"{format_bytes(self.kv_cache)}; give at least "
                f"{format_bytes(need)} to --memory (more for a useful neuron cache), or lower "
                f"--max-context (the KV cache for {self.max_context} tokens takes "
                f"{format_bytes(self.kv_cache)})"
            )

    def require_experts(self, expert_ffn: int, top_k: int) -> None:
        """MoE: FlashError unless every layer's cache holds the `top_k` experts of one token."""
        self.fit_working(top_k * expert_ffn)
        if self.capacity >= top_k * expert_ffn:
            return
        others = self.total - self.free_for_cache
        need = top_k * expert_ffn * self.num_layers * self.neuron_bytes
        raise FlashError(
            f"memory budget {format_bytes(self.total, 2)} is too small for this MoE: every layer "
            f"must hold the {top_k} experts a token picks ({format_bytes(need)} in all) beside "
            f"{format_bytes(others)} of resident weights, KV cache and buffers; give at least "
            f"{format_bytes(others + need, 2)} to --memory, or lower --max-context (the KV cache "
            f"for {self.max_context} tokens takes {format_bytes(self.kv_cache)})")

    def as_dict(self, mode: str) -> dict:
        out = asdict(self)
        out.update(mode=mode, capacity=self.capacity, neuron_cache=self.neuron_cache,
                   capacity_fraction=round(self.capacity / self.ffn_dim, 4))
        return out


def plan_budget(manifest: Manifest, config: dict, memory, max_context: int,
                compute: str | None = None, layers: range | None = None,
                resident: int | None = None, *, model, kv_caches: int = 1) -> Budget:
    """The budget of a flash dir; `compute` = "dequantized" (quantized records held as float
    values in the cache) makes a cached neuron cost its float size instead of its record's.
    `layers` and `resident`: a pipeline stage's layers and its share of the resident weights
    (distributed.py), whose budget covers only them (`50%model`: of its share). `model`: the
    model built from config.json (lazily: nothing evaluated), whose caches count (`kv_bytes`):
    `kv_caches` contexts of them (a server's kept prompt caches)."""
    m = manifest
    n = m.num_layers if layers is None else len(layers)
    resident = m.resident_bytes if resident is None else resident
    d_float = m.d_model * m.itemsize
    neuron = len(m.parts) * d_float if compute == "dequantized" else m.payload_bytes
    if m.experts and m.quantization is not None:  # cached scales and biases held as float32
        neuron += len(m.parts) * 2 * (m.d_model // m.quantization.group_size) * (4 - m.itemsize)
    if m.quantization is None:
        dense_neuron = m.payload_bytes
    else:  # dense: gate/up stay quantized, the down column is held dequantized (format.py)
        dense_neuron = sum(p.nbytes for p in m.parts if p.axis == "row") + d_float
    dense_ffn = n * m.ffn_dim * dense_neuron
    size = resident + n * m.ffn_dim * m.payload_bytes  # the model's bytes on disk
    # the stream buffer (a dense FFN's: two, one read while the other computes), and for packed
    # records the reader's scratch blocks as large as one
    buffers = stream_rows(m) * m.record_bytes * ((1 if m.experts else 2) + (1 if m.packed else 0))
    # a chunk's parts made contiguous (ffn.py: float records copied out, quantized ones by MLX)
    buffers += stream_rows(m) * m.payload_bytes
    if compute == "dequantized":  # one piece being dequantized: MLX's transient + its values
        buffers += DEQUANT_ROWS * (DEQUANT_PEAK + 1) * d_float * len(m.parts)
    # the caches' bookkeeping: each layer's row of every neuron, each cached neuron's id and age
    buffers += n * m.ffn_dim * 8
    neuron += NEURON_BOOKKEEPING
    if m.experts:  # the lookahead's buffer: one token's experts
        top_k = config.get(models.flash_spec(m.architecture).top_k or "", 1)
        buffers += top_k * m.expert_ffn * m.record_bytes
    budget = Budget(
        total=parse_memory(memory, size), model=size, resident=resident,
        kv_cache=kv_caches * kv_bytes(model, config, max_context, m.itemsize, layers),
        kv_caches=kv_caches, buffers=buffers,
        dense_ffn=dense_ffn, neuron_bytes=neuron,
        num_layers=n, ffn_dim=m.ffn_dim, max_context=max_context,
    )
    budget.allocator_cache = min(ALLOCATOR_CACHE_BYTES, budget.total // ALLOCATOR_CACHE_SHARE)
    top_k = config.get(models.flash_spec(m.architecture).top_k or "", 1)
    tokens = PREFILL_TOKENS
    while (tokens > MIN_PREFILL_TOKENS and activation_bytes(m, config, tokens, max_context, top_k)
           > budget.total // ACTIVATION_SHARE):
        tokens //= 2
    budget.prefill_tokens = tokens
    # not a field (as_dict leaves it out): what a smaller step would hold (fit_working)
    budget.activation_of = lambda t: activation_bytes(m, config, t, max_context, top_k)
    budget.activations = budget.activation_of(tokens)
    return budget
