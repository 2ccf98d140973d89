"""The strategies `mlx-flash bench` compares, and which of them can run here."""

from __future__ import annotations

from .. import platform
from ..errors import FlashError

STRATEGIES = ("dense", "naive", "hybrid", "predicted", "+window", "+bundling", "+cache", "all",
              "+lookahead", "sketch", "mmap", "mmap-nolimit")
# An MoE's: every routed expert read per token, + the expert cache, + lookahead and the probed
# reader (`all`), and the mmap baseline over the flash dir's own records
MOE_STRATEGIES = ("dense", "naive", "+cache", "all", "mmap")
# An mlx-lm MoE dir's (zero-copy: its experts read from its own safetensors): mlx-lm's own
# dense load, every routed expert read per token, the expert cache, + the lookahead (`all`)
ZERO_COPY_STRATEGIES = ("dense", "naive", "+cache", "all")
FLASH = {  # runtime.load keywords per flash strategy; "probed": reader settings from the profile
    "naive": dict(mode="naive"),
    # the exact set through the cache: an MoE's routed experts, a dense FFN's true active
    # neurons (every one for SiLU/GELU: what `auto` runs on SmolLM2)
    "+cache": dict(mode="oracle", lookahead=False),
    "hybrid": dict(mode="hybrid"),
    "predicted": dict(mode="predicted", window=1, bundled=False, lookahead=False),
    "+window": dict(mode="predicted", bundled=False, lookahead=False),
    "+bundling": dict(mode="predicted", bundled=True, lookahead=False),
    "all": dict(mode="predicted", bundled=True, probed=True),
    # a dense model's `all` + the lookahead (off by default: runtime.load)
    "+lookahead": dict(mode="predicted", bundled=True, probed=True, lookahead=True),
    # a gated FFN's top share per token by its low-bit sketch (`mlx-flash sketch`), the rest as
    # `all` (window, bundles, the probed reader)
    "sketch": dict(mode="sketch", bundled=True, probed=True),
}
PREDICTED = ("predicted", "+window", "+bundling", "all", "+lookahead")


def parse_strategies(spec: str | list[str] | None, experts: bool = False,
                     zero_copy: bool = False) -> list[str]:
    """Strategy names from a comma list (`window`, `bundling`, `cache`, `lookahead` may drop
    the `+`); default: all of them, an MoE's (`experts`), or an mlx-lm MoE dir's
    (`zero_copy`)."""
    if spec is None:
        return list(ZERO_COPY_STRATEGIES if zero_copy else
                    MOE_STRATEGIES if experts else STRATEGIES)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in (s.strip() for s in items if s.strip()):
        name = f"+{item}" if f"+{item}" in STRATEGIES else item
        if name not in STRATEGIES:
            raise FlashError(f"unknown strategy {item!r}; choose from {', '.join(STRATEGIES)}")
        out.append(name)
    return out


def _unavailable(name, budget, has_predictors, ckpt, parent, limit, experts=False,
                 zero_copy=False, sketch: int = 0) -> str | None:
    """Why strategy `name` cannot run here (None: it can); `sketch`: the dir's sketch bytes."""
    dense = budget.resident + budget.dense_ffn
    if name == "dense" and dense > 0.75 * platform.physical_memory_bytes():
        return f"the dense model ({dense / 1e9:.1f} GB) does not fit in this machine's memory"
    if zero_copy and name not in ZERO_COPY_STRATEGIES:
        return ("a flash dir's strategy (`mlx-flash convert` the dir); an mlx-lm MoE dir runs "
                + ", ".join(ZERO_COPY_STRATEGIES))
    if experts and name not in MOE_STRATEGIES + ("mmap-nolimit",):
        return "a dense-FFN strategy; an MoE runs " + ", ".join(MOE_STRATEGIES)
    if name in FLASH and budget.capacity < 1:
        return "the budget does not hold the resident weights (raise --memory)"
    if name in PREDICTED and not (has_predictors or experts):
        return "no predictors in the model dir (run `mlx-flash calibrate`)"
    if name == "sketch" and not experts:
        if not sketch:
            return "no sketch in the model dir (run `mlx-flash sketch`)"
        if budget.capacity_with(sketch) < 1:
            return "the budget leaves no room for the sketch beside the resident weights"
    if name.startswith("mmap") and ckpt is None and not experts:
        return "no dense safetensors checkpoint of the same weights (pass --checkpoint)"
    if name == "mmap" and parent is None:
        return ("memory limit disabled (--no-limit)" if not limit else
                "needs a real memory limit: root and the cgroup v1 memory controller (Linux)")
    return None
