"""Time to first token on turns 2 and 3 of a conversation through `mlx-flash serve`, with the
kept prompt cache and without it (issue 28).

    python tools/measure_serve_reuse.py MODEL_DIR --memory 50%model [--max-context 1024]
        [--system-words 120] [--json]

One server (`--prompt-caches 1`), one conversation of three user turns (a long system prompt,
so that the prefill counts). Turns 1-3 run in order: turns 2 and 3 find the turn before in the
kept cache. Then each of turns 2 and 3 is sent again right after an unrelated request, which
takes the one cache: the same prompt, every token prefilled. Figures: the server's own
`first_token_ms` (x_flash: from the request's turn in the queue to its first token),
`cached_tokens` and `prefilled_tokens`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the file system keeps every open descriptor in a table of the process and the kernel "
         "checks each call against it before it reads or writes a block").split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--memory", default="50%model")
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--system-words", type=int, default=120)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import openai

    log = Path("/tmp/measure_serve_reuse.log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_flash.cli", "serve", "--model", a.model, "--port", "0",
         "--memory", a.memory, "--max-context", str(a.max_context)], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        for _ in range(3000):
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log.read_text())
            if found or proc.poll() is not None:
                break
            time.sleep(0.1)
        if not found:
            sys.exit(log.read_text())
        client = openai.OpenAI(base_url=found.group(1) + "/v1", api_key="none", max_retries=0,
                               timeout=3600)
        system = " ".join(WORDS[i % len(WORDS)] for i in range(a.system_words))
        turns = ["What does open() return?", "And when it fails?", "How do I close it?"]

        def ask(messages):
            r = client.chat.completions.create(messages=messages, model="default_model",
                                               max_tokens=a.max_tokens, temperature=0)
            x = r.model_extra["x_flash"]
            return r.choices[0].message.content or "", {
                k: x[k] for k in ("prompt_tokens", "cached_tokens", "prefilled_tokens",
                                  "first_token_ms")}

        history = [{"role": "system", "content": system}]
        prompts, rows = [], []
        for i, turn in enumerate(turns, 1):
            history.append({"role": "user", "content": turn})
            prompts.append(list(history))
            text, fig = ask(history)
            rows.append({"turn": i, "reuse": i > 1, **fig})
            history.append({"role": "assistant", "content": text})
        for i in (2, 3):
            ask([{"role": "user", "content": f"unrelated question number {i}"}])
            _, fig = ask(prompts[i - 1])
            rows.append({"turn": i, "reuse": False, **fig})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    if a.json:
        print(json.dumps({"model": a.model, "memory": a.memory, "rows": rows}, indent=1))
        return
    print("| turn | kept cache | prompt tokens | cached | prefilled | first token ms |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["turn"], not r["reuse"])):
        print(f"| {r['turn']} | {'yes' if r['reuse'] else 'no'} | {r['prompt_tokens']} | "
              f"{r['cached_tokens']} | {r['prefilled_tokens']} | {r['first_token_ms']:,.0f} |")


if __name__ == "__main__":
    main()
