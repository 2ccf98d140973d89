"""mlx-flash: run language models larger than memory, FFN neurons streamed from flash.

    from mlx_flash import load, generate, stream_generate
    model, tokenizer = load("models/opt-1.3b-flash", memory="4GB")
    print(generate(model, tokenizer, "Hello", max_tokens=50)["text"])
    for r in stream_generate(model, tokenizer, "Hello", max_tokens=50):
        print(r.text, end="", flush=True)
    print(r.stats["flash_bytes_per_token"], r.stats["cache_hit_rate"])
"""

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate"]


def __getattr__(name):
    # Lazy: `mlx-flash --help` should not pay for importing MLX.
    if name == "load":
        from .api import load

        return load
    if name in ("generate", "stream_generate"):
        import importlib

        return getattr(importlib.import_module("mlx_flash.generation"), name)
    raise AttributeError(f"module 'mlx_flash' has no attribute {name!r}")
