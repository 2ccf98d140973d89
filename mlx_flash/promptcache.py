"""KV caches that outlive a request: each holds a known token list, and the next prompt that
starts with some of those tokens prefills only the rest.

`PromptCache` is one mlx-lm prompt cache and the tokens it holds (chat keeps one across turns);
`PromptCaches` is the server's LRU of them: a request takes the entry sharing the longest prefix
with its prompt (or the least recently used one, emptied) and gives it back with what it then
holds. Their number is fixed when the model loads (`kv_caches`): the budget reserves one context
of KV cache for each (memory.plan_budget), so keeping them never takes memory the budget did not
count. A hybrid model's linear-attention state cannot be cut back to a shorter prefix: its cache
is reused only when the new prompt extends every token it holds.
"""

from __future__ import annotations

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from .generation import new_cache


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """mlx-lm's KV cache of `model` and `tokens`, the ids it holds in order."""

    def __init__(self, model):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.cache = new_cache(self.model)
        self.tokens: list[int] = []

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def usable(self, tokens: list[int]) -> int:
        """How many of `tokens` this cache would keep for them (at least one left to feed)."""
        keep = min(common_prefix(self.tokens, tokens), len(tokens) - 1)
        if keep < len(self.tokens) and not can_trim_prompt_cache(self.cache):
            return 0
        return keep

    def reuse(self, tokens: list[int]) -> int:
        """Cut the cache back to the prefix it shares with `tokens`; return its length."""
        keep = self.usable(tokens)
        if keep < len(self.tokens):
            if keep and can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, len(self.tokens) - keep)
                self.tokens = self.tokens[:keep]
            else:
                self.reset()
        return keep

    def sync(self, known: list[int]) -> None:
        """After a generation (finished or not), make the cache hold exactly a prefix of `known`
        (the prompt and the tokens yielded). Every layer trims to the shortest: a step cut short
        may have reached some layers only."""
        offsets = [c.offset for c in self.cache if hasattr(c, "offset")]
        if len(offsets) != len(self.cache) or not can_trim_prompt_cache(self.cache):
            # linear-attention state beside the attention layers: it holds the tokens the
            # attention layers took where they all took the same, and it cannot be cut back
            n = offsets[0] if offsets and min(offsets) == max(offsets) else 0
            if 0 < n <= len(known):
                self.tokens = list(known[:n])
            else:
                self.reset()
            return
        n = min(min(offsets), len(known))
        for c in self.cache:
            c.trim(c.offset - n)
        self.tokens = list(known[:n])


class PromptCaches:
    """At most `size` PromptCaches of `model`, least recently used first."""

    def __init__(self, model, size: int = 1):
        if size < 1:
            raise ValueError("size must be >= 1")
        self.model, self.size = model, size
        self.entries: list[PromptCache] = []  # least recently used first

    def take(self, tokens: list[int]) -> tuple[PromptCache, int]:
        """(the entry to generate `tokens` in, cut back to the prefix it keeps, that prefix's
        length): the one keeping the most, else a new one while there is room, else the least
        recently used, emptied. The entry is out of the LRU until `give`."""
        best = max(self.entries, key=lambda e: e.usable(tokens), default=None)
        if best is not None and best.usable(tokens) > 0:
            self.entries.remove(best)
            return best, best.reuse(tokens)
        if len(self.entries) < self.size:
            return PromptCache(self.model), 0
        entry = self.entries.pop(0)
        entry.reset()
        return entry, 0

    def give(self, entry: PromptCache, known: list[int]) -> None:
        """Back into the LRU as the most recently used, holding a prefix of `known`."""
        entry.sync(known)
        self.entries.append(entry)

    def stats(self) -> dict:
        return {"prompt_caches": len(self.entries), "prompt_caches_max": self.size,
                "prompt_cache_tokens": [len(e.tokens) for e in self.entries],
                "prompt_cache_bytes": sum(e.nbytes for e in self.entries)}
