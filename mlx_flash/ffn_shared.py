"""What the FlashMLPs of one dense model share (`ffn.py`): `FlashRuntime`, the manifest, the
readers, the stream buffers and the counters."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import mlx.core as mx

from . import activations, models, platform
from .format import Manifest
from .memory import stream_rows
from .state import FlashStats
from .storage import FlashReader, MappedReader, aligned_empty

if TYPE_CHECKING:
    from .ffn import FlashMLP

# The overflow (active neurons beyond the cache) is read as whole runs of records where at least
# this share of a run is wanted: one large request beats many small ones below it (the probe here:
# 16 KiB requests ~0.8 GB/s, 1 MiB ~2.4 GB/s), and the unwanted neurons' products are masked out,
# so the result is the same. A gated model's predicted sets (SmolLM2: 87%) are that dense.
BRIDGE_DENSITY = 0.5


class FlashRuntime:
    """What the FlashMLPs of one model share: the manifest, the reader, buffers and counters."""

    def __init__(self, manifest: Manifest, mode: str, window: int, threads: int, act: str,
                 max_request_bytes: int = 1 << 20, bundled: bool = True,
                 compute: str | None = None, mapped: bool = False):
        self.manifest = manifest
        # quantized records: "quantized" (quantized_matmul over a quantized cache) or
        # "dequantized" (dequantized on insert into a float cache); None for float records
        self.compute = compute
        self.spec = models.flash_spec(manifest.architecture)
        self.mode = mode
        self.window = window
        self.act = activations.mlx_fn(act)
        self.exact_sparse = activations.is_exact_sparse(act)
        self.cut = activations.oracle_cut(act) if self.exact_sparse else 0.0  # the oracle's
        # the overflow's runs read whole from this share wanted; sketch mode reads its top share
        # only (the neurons it leaves out are what it saves)
        self.bridge_density = 1.0 if mode == "sketch" else BRIDGE_DENSITY
        # bundled=False (benchmarks): each record part is its own read, as separate matrices.
        spans = None if bundled else _part_spans(manifest)
        if mapped:  # benchmarks: the mmap baseline of an MoE (page cache, no direct reads)
            self.reader = MappedReader(manifest.ffn_path, manifest.record_bytes)
        else:
            self.reader = FlashReader(manifest.ffn_path, manifest.record_bytes, threads,
                                      max_request_bytes=max_request_bytes, part_spans=spans)
        self.stats = FlashStats()
        # (rows, record) buffer through which whole layers and the overflow stream, and (float
        # records) each record part of it copied out contiguous: the products multiply the payload
        rows = stream_rows(manifest)
        self.chunk, self.chunk_np = aligned_empty(rows, manifest.record_bytes)
        # a dense FFN streams through two such buffers: the next chunk is read while this one
        # computes (FlashMLP._stream), by a thread of its own; an MoE reads its own way (moe.py)
        self.chunks = [(self.chunk, self.chunk_np)]
        if not manifest.experts:
            self.chunks.append(aligned_empty(rows, manifest.record_bytes))
        self._stream_pool = ThreadPoolExecutor(1, thread_name_prefix="flash-stream")
        self._stage = ([aligned_empty(rows, p.nbytes) for p in manifest.parts]
                       if manifest.quantization is None else [])
        self.layers: list[FlashMLP] = []
        # values mode (an 8-bit sketch, sketch.py): each record's down span alone is read
        self.down_reader: FlashReader | None = None
        self.down_layer_bytes: int | None = None  # a layer's rows in down.bin, when read there
        self.down_span = (0, 0)  # the down row's bytes in what the down reader reads
        self.down_stage = None  # (rows, what the down reader reads) buffer it reads into
        # the reads started a layer early: moe.Lookahead (MoE) or lookahead.Prefetch (dense)
        self.lookahead = None

    def read_values(self, threads: int, max_request_bytes: int,
                    down: tuple[str, int, int] | None) -> None:
        """Values mode: the caches hold each neuron's down row only, read by a reader of its
        own: from `down` (`down.bin`: path, row bytes, layer bytes), where a layer's rows lie
        one after another, or else each record's down span (whole blocks of its own)."""
        m = self.manifest
        rows = self.chunk.shape[0]
        if down is not None:
            path, row_bytes, self.down_layer_bytes = down
            self.down_reader = FlashReader(path, row_bytes, threads,
                                           max_request_bytes=max_request_bytes)
            self.down_span = (0, row_bytes)
            self.down_stage = aligned_empty(rows, row_bytes)[1]
            return
        lo, hi = self.down_span = m.part(self.spec.column_part.name).span
        self.down_reader = FlashReader(m.ffn_path, m.record_bytes, threads,
                                       max_request_bytes=max_request_bytes, part_spans=[(lo, hi)])
        self.down_stage = self.chunk_np

    def down_offset(self, layer: int, offset: int) -> int:
        """Where the cache reader finds `layer` (at `offset` in the FFN file)."""
        return offset if self.down_layer_bytes is None else layer * self.down_layer_bytes

    @property
    def cache_reader(self) -> FlashReader:
        """What fills the neuron caches: the down reader in values mode."""
        return self.down_reader or self.reader

    def read_in_background(self, read, *args) -> Future:
        """`read(*args)` on the stream thread (one read at a time, in order)."""
        return self._stream_pool.submit(read, *args)

    def staged_parts(self, n: int, buffer: int = 0) -> list[mx.array]:
        """The first n records of stream buffer `buffer`, each part as a contiguous (n, part bytes)
        uint8 array (a numpy copy: MLX's CPU matmul over a strided column slice of the records
        costs 2-3x the contiguous one at OPT-6.7B shapes, and padding x to the record width
        multiplies every part's zeros). Valid until the next call."""
        out = []
        for p, (array, view) in zip(self.manifest.parts, self._stage, strict=True):
            lo, hi = p.span
            view[:n] = self.chunks[buffer][1][:n, lo:hi]
            out.append(array[:n])
        return out

    def close(self) -> None:
        if self.lookahead is not None:
            self.lookahead.close()
        self._stream_pool.shutdown(wait=True)
        self.reader.close()
        if self.down_reader is not None:
            self.down_reader.close()


def _part_spans(m: Manifest) -> list[tuple[int, int]]:
    """Byte span of each record part: what one read per part has to fetch (for aligned records,
    widened to the direct-I/O blocks; the reader widens packed ones itself)."""
    if m.packed:
        return [p.span for p in m.parts]
    align = platform.direct_io_alignment()
    return [(lo // align * align, -(-hi // align) * align) for lo, hi in (p.span for p in m.parts)]
