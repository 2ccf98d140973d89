"""llama.cpp's own speed on a GGUF (mmap), cold, optionally under a real memory limit: the
baseline issue 15 compares flash decode with. Needs llama-cpp-python (not a dependency of ours:
a venv of its own, e.g. `CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF
-DGGML_AMX_TILE=OFF -DGGML_OPENMP=OFF" pip install llama-cpp-python`; the native build crashed in
decode on this VM) and root on Linux (a cgroup v1 memory group, page cache included).

    python tools/measure_llamacpp.py GGUF [LIMIT_BYTES]   -> one JSON line

Greedy, 24 tokens after the same prompt as tools/measure_lookahead.py, 2 threads; tok/s of the
decode steps; `cgroup_peak` the group's peak (the mapped model's pages count).
"""
import json
import os
import sys
import time
from pathlib import Path

import llama_cpp

path = sys.argv[1]
limit = int(sys.argv[2]) if len(sys.argv) > 2 else None
PROMPT = "What is the capital of France? Answer in one long paragraph about its history."
TOKENS = 24

where = [ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().splitlines()
         if "memory" in ln.split(":", 2)[1].split(",")][0]
home = Path("/sys/fs/cgroup/memory") / where.lstrip("/")
group = home / f"llamacpp-{os.getpid()}"  # a group of our own, limited or not, for its peak
group.mkdir()
if limit:
    (group / "memory.limit_in_bytes").write_text(str(limit))
(group / "cgroup.procs").write_text(str(os.getpid()))
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold start
os.close(fd)
llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, use_mmap=True, verbose=False)
tokens = llm.tokenize(PROMPT.encode())
times, out = [], []
t = time.perf_counter()
for tok in llm.generate(tokens, top_k=1, temp=0.0):
    now = time.perf_counter()
    times.append(now - t)
    t = now
    out.append(tok)
    if len(out) == TOKENS + 1:
        break
decode = times[1:]  # the first includes the prompt
peak = int((group / "memory.max_usage_in_bytes").read_text())
print(json.dumps({"limit": limit, "tok_per_s": len(decode) / sum(decode),
                  "cgroup_peak": peak, "text": llm.detokenize(out).decode(errors="replace")}))
(home / "cgroup.procs").write_text(str(os.getpid()))  # back, so the group can go
group.rmdir()
