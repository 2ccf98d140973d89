"""The mmap baseline: every weight mapped from the dense checkpoint, copied in layer by layer."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..dtypes import BY_SAFETENSORS, FLOATS, to_mx
from ..errors import FlashError


def _checkpoint_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


class _Mapped:
    """Copies of mapped tensors in one set of reusable MLX buffers (every layer has the same
    shapes). The page cache holds the model, as with llama.cpp's default mmap; the copy into MLX
    memory (MLX cannot compute on foreign memory) is this baseline's only extra work, timed with
    the page faults it triggers."""

    def __init__(self):
        self.seconds = 0.0
        self.buffers = {}  # parameter path inside a layer -> (MLX array, writable numpy view)

    def fill(self, key: str, view: np.ndarray, dtype: str):
        """The buffer of `key` holding a copy of `view` (raw bits of floating `dtype`)."""
        import mlx.core as mx

        if key not in self.buffers:
            arr = mx.zeros(view.shape, dtype=mx.uint16 if view.itemsize == 2 else mx.float32)
            mx.eval(arr)
            self.buffers[key] = (arr, np.array(arr, copy=False))
        arr, dst = self.buffers[key]
        np.copyto(dst, view)  # page faults (disk reads under the limit) + memcpy
        return arr.view(FLOATS[dtype].mx)


class _Source:
    """What a mapped layer reads: (parameter path, view of the mapping, dtype) per tensor."""

    def __init__(self, tensors: list, empty: dict, mapped: _Mapped):
        self.tensors, self.empty, self.mapped = tensors, empty, mapped


def _split_fused(views: dict, spec) -> dict:
    """`views` with each fused tensor (phi3's `gate_up_proj`) replaced by its parts' views under
    their own HF names: row slices of the mapping, so nothing is copied (`sanitize`, which splits
    it otherwise, would need the tensor in memory)."""
    fused = defaultdict(list)  # fused module pattern -> [(part module pattern, chunk, chunks)]
    for p in spec.parts:
        if p.fused:
            module, chunk, chunks = p.fused
            fused[module].append((p.module, chunk, chunks))
    if not fused:
        return views
    patterns = [(re.compile(r"(\d+)".join(map(re.escape, module.split("{layer}"))) + r"\.(\w+)"),
                 parts) for module, parts in fused.items()]
    out = {}
    for name, (view, dtype) in views.items():
        key = spec.checkpoint_key(name)
        hit = next(((m, parts) for pat, parts in patterns if (m := pat.fullmatch(key))), None)
        if hit is None:
            out[name] = (view, dtype)
            continue
        m, parts = hit
        layer, kind = m.groups()
        for module, chunk, chunks in parts:
            n = view.shape[0] // chunks  # (chunks * ffn, d): chunk `chunk` of the rows
            out[f"{module.format(layer=layer)}.{kind}"] = (view[chunk * n : (chunk + 1) * n], dtype)
    return out


def _mapped_layer_class():
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    class MappedLayer(nn.Module):
        """A decoder layer whose weights are copied in from the mapping at each call, then
        dropped: the page cache (under the limit) is all that holds the model."""

        def __init__(self, inner, source: _Source):
            super().__init__()
            self.inner, self._src = inner, source
            inner.update(source.empty)

        def __getattr__(self, key: str):
            # The model's loop may read its layers' own attributes (e.g. a sliding-window flag).
            # Children and parameters live in the Module's dict; "inner" is absent until set.
            if key in self or "inner" not in self:
                return super().__getattr__(key)
            return getattr(self["inner"], key)

        def __call__(self, x, mask=None, cache=None):
            # The previous layer's output was evaluated: nothing pending reads the buffers.
            src = self._src
            t0 = time.perf_counter()
            params = tree_unflatten([(k, src.mapped.fill(k, v, dt)) for k, v, dt in src.tensors])
            src.mapped.seconds += time.perf_counter() - t0
            self.inner.update(params)
            y = self.inner(x, mask, cache)
            mx.eval(y)
            self.inner.update(src.empty)
            return y

    return MappedLayer


def _mapped_model(ckpt: Path):
    """The model with every weight memory-mapped from the checkpoint's safetensors files."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from .. import format as fmt
    from .. import models
    from ..checkpoint import load_config
    from ..loader import build_model, load_tokenizer

    config = load_config(ckpt)
    model = build_model(config)
    views = {}
    for f in _checkpoint_files(ckpt):
        header, start = fmt.read_safetensors_header(f, f.name)
        mapping = np.memmap(f, dtype=np.uint8, mode="r")
        for name, e in header.items():
            lo, hi = e["data_offsets"]
            dtype = BY_SAFETENSORS[e["dtype"]]
            if dtype.name not in FLOATS:
                raise FlashError(f"{f}: {name} is {e['dtype']}; the mmap baseline maps floats only")
            view = mapping[start + lo : start + hi].view(dtype.storage).reshape(e["shape"])
            views[name] = (view, dtype.name)
    spec = models.flash_spec(config["model_type"])
    views = {k: v for k, v in views.items()  # a multimodal checkpoint's vision tower
             if not spec.checkpoint_key(k).startswith(spec.unused)}
    views = _split_fused(views, spec)
    by_layer, rest = defaultdict(list), {}
    for name, (view, dtype) in views.items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m is None:
            rest[name] = (view, dtype)
            continue
        try:
            path = next(iter(model.sanitize({name: None})))  # HF name -> parameter path
        except (AttributeError, TypeError):  # a sanitize that converts values (a conv layout)
            raise FlashError(f"{ckpt}: {config['model_type']}'s weights are converted on load, "
                             "not only renamed; the mmap baseline maps them as stored, so this "
                             "type has none (leave mmap out of --strategies)") from None
        by_layer[int(m.group(1))].append((re.sub(r"^.*\.layers\.\d+\.", "", path), view, dtype))
    mapped, layer_class = _Mapped(), _mapped_layer_class()
    layers = model.layers
    for i, layer in enumerate(layers):
        empty = tree_map(lambda _: mx.zeros((0,)), layer.parameters())
        layers[i] = layer_class(layer, _Source(by_layer[i], empty, mapped))
    # Embeddings, final norm: small, loaded once (the dense baselines count them too).
    model.load_weights(list(model.sanitize({k: to_mx(v, dt) for k, (v, dt) in rest.items()}).items()),
                       strict=False)
    mx.eval(model.parameters())
    return model, load_tokenizer(ckpt), mapped
