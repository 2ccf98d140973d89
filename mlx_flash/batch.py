"""Batch generation: one model load, a JSONL file of prompts in, a JSONL file of results out.

Input lines: `{"id": ..., "prompt": ..., <options>}`. Output lines: `{"id", "text", "tokens",
"stats"}` or `{"id", "line", "error"}` (`id` is null when the input line has no usable one). Each
output line is written whole with one append and flushed, so a run stopped by Ctrl-C or a crash
leaves a valid file; a rerun skips what it holds and truncates a torn last line, if any.

The output is only ever appended to. With `retry_errors` the ids that hold only an error record
run again and their new record is appended, so an id may have several records: its result record
(there is at most one) counts, else its last error record.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .errors import FlashError
from .generation import as_chat, defer_sigint, generate

# Generation options an input line may set, with a check of the value.
_NUMBER = (int, float)
OPTIONS = {
    "max_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "temp": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "min_p": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "repetition_penalty": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "seed": (lambda v: _is_int(v), "an integer"),
    "stop": (lambda v: isinstance(v, str) or (isinstance(v, list)
                                               and all(isinstance(s, str) for s in v)),
             "a string or a list of strings"),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, _NUMBER) and not isinstance(v, bool)


@dataclass
class Job:
    """One input line: its number, id, prompt and options, or why it cannot run."""

    line: int
    id: object = None
    prompt: str | None = None
    options: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class Plan:
    """What a run will do: the input's jobs, and which of them the output already holds."""

    input: Path
    out: Path
    jobs: list[Job]
    done: int
    pending: list[Job]


def _parse(n: int, text: str) -> Job:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Job(n, error=f"line {n}: not JSON ({e.msg})")
    if not isinstance(obj, dict):
        return Job(n, error=f"line {n}: expected a JSON object, got {type(obj).__name__}")
    job = Job(n, id=obj.get("id"))
    if job.id is None or not (isinstance(job.id, str) or _is_int(job.id)):
        job.id = None
        job.error = f"line {n}: \"id\" must be a string or an integer"
        return job
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        job.error = f"line {n}: \"prompt\" must be a non-empty string"
        return job
    job.prompt = prompt
    for key, value in obj.items():
        if key in ("id", "prompt"):
            continue
        if key not in OPTIONS:
            job.error = f"line {n}: unknown option {key!r}; known: {', '.join(OPTIONS)}"
            return job
        check, want = OPTIONS[key]
        if not check(value):
            job.error = f"line {n}: {key} must be {want}"
            return job
        job.options[key] = value
    return job


def read_jobs(path: Path) -> list[Job]:
    """Every non-blank line of the input file as a Job (bad lines carry their error)."""
    if not path.is_file():
        raise FlashError(f"{path}: no such file")
    jobs, seen = [], {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            job = _parse(n, text)
            key = _key(job.id)
            if job.id is not None and key in seen:
                job.error = f"line {n}: duplicate id {job.id!r} (first on line {seen[key]})"
            elif job.id is not None:
                seen[key] = n
            jobs.append(job)
    return jobs


def _key(id_) -> str:
    return json.dumps(id_)


@dataclass
class Held:
    """What an output file holds: ids with a result, ids with an error record, and the error
    text of each input line that got an error record."""

    results: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    errors: dict[int, str] = field(default_factory=dict)


def read_done(path: Path) -> Held:
    """What the output file already holds. A torn last line is truncated away."""
    held = Held()
    if not path.exists():
        return held
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a write cut short by a crash: drop it, the job runs again
        with open(path, "r+b") as f:
            f.truncate(end)
    for n, text in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), 1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or "id" not in rec:
            raise FlashError(f"{path}: line {n} is not a batch output record; give another --out "
                             "(an existing output is only ever appended to)")
        if "error" not in rec:
            held.results.add(_key(rec["id"]))
            continue
        if "line" in rec:
            held.errors[rec["line"]] = rec["error"]
        if rec["id"] is not None:
            held.failed.add(_key(rec["id"]))
    return held


def prepare(input: str | Path, out: str | Path, retry_errors: bool = False) -> Plan:
    """Read the input and what the output already holds; checked before any model loads.

    `retry_errors`: run again the ids whose only record is an error (a prompt too long, a
    failed generation, an input line fixed since); a line whose input error is unchanged is
    not rerun.
    """
    input, out = Path(input), Path(out)
    if out.exists() and input.exists() and out.resolve() == input.resolve():
        raise FlashError(f"--out {out} is the input file; give another path")
    if not out.parent.is_dir():
        raise FlashError(f"--out {out}: no such directory {out.parent}")
    jobs = read_jobs(input)
    held = read_done(out)

    def done(job: Job) -> bool:
        if job.error is None and _key(job.id) in held.results:
            return True
        if retry_errors:  # the same input error again would only repeat the record
            return job.error is not None and held.errors.get(job.line) == job.error
        return job.line in held.errors or (job.error is None and _key(job.id) in held.failed)

    pending = [j for j in jobs if not done(j)]
    return Plan(input, out, jobs, len(jobs) - len(pending), pending)


class _Appender:
    """Appends whole lines: one write per record, with Ctrl-C held until it is done."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        data = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode())
        with defer_sigint() as pending:
            while data:
                data = data[os.write(self.fd, data):]
        if pending.hit:
            raise KeyboardInterrupt

    def close(self) -> None:
        os.close(self.fd)


def _run_one(model, tokenizer, job: Job, defaults: dict, raw: bool) -> dict:
    opts = {**defaults, **job.options}
    result = generate(model, tokenizer, as_chat(tokenizer, job.prompt, raw), **opts)
    return {"id": job.id, "text": result["text"], "tokens": result["tokens"],
            "stats": result["stats"]}


def run(model, tokenizer, plan: Plan, defaults: dict | None = None, progress: bool = True,
        raw: bool = False) -> dict:
    """Generate for every pending job of `plan`, appending one output line per job.

    `defaults`: generation options (`max_tokens`, `temp`, `top_p`, `repetition_penalty`,
    `seed`, `stop`, ...) that an input line's own options override. A line that cannot run
    (bad JSON, no prompt, a bad option, a duplicate id, a prompt longer than the context, a
    generation error) gets an error record and the batch goes on. Prompts go through the
    tokenizer's chat template when it has one, unless `raw`. Returns a summary; with
    nothing pending, the model is not touched (it may be None).
    """
    summary = {"input": str(plan.input), "out": str(plan.out), "total": len(plan.jobs),
               "skipped": plan.done, "written": 0, "errors": 0, "tokens": 0}
    if not plan.pending:
        return summary
    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    writer = _Appender(plan.out)
    bar = tqdm(total=len(plan.jobs), initial=plan.done, desc="batch", unit="prompt",
               disable=not progress, dynamic_ncols=True)
    tic = time.perf_counter()
    try:
        for job in plan.pending:
            if job.error is not None:
                record = {"id": job.id, "line": job.line, "error": job.error}
            else:
                try:
                    record = _run_one(model, tokenizer, job, defaults, raw)
                except (KeyboardInterrupt, MemoryError):
                    raise
                except Exception as e:  # one prompt's failure must not stop the batch
                    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                    record = {"id": job.id, "line": job.line, "error": msg}
            writer.write(record)
            summary["written"] += 1
            summary["errors"] += "error" in record
            summary["tokens"] += len(record.get("tokens", ()))
            bar.set_postfix_str(f"{summary['tokens'] / (time.perf_counter() - tic):.1f} tok/s",
                                refresh=False)
            bar.update(1)
    finally:
        bar.close()
        writer.close()
    summary["wall_s"] = round(time.perf_counter() - tic, 3)
    return summary
