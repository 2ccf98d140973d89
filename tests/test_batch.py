"""Batch generation: one load, bad lines recorded, resumable after Ctrl-C or a crash."""

import json
import signal
import subprocess
import sys
import time

import pytest

from mlx_flash import batch, generate, load
from mlx_flash.errors import FlashError

from .conftest import EMBEDDED

TOPICS = ["open()", "close()", "fork()", "a pipe", "a socket", "chmod", "the shell", "grep",
          "a signal", "mmap", "a thread", "a file", "dup2()", "exec()", "kill", "a lock", "sed",
          "read()", "write()", "a process"]


@pytest.fixture(scope="module")
def dense():
    return load(EMBEDDED)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def whole_lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_bad_lines_are_recorded_and_the_batch_goes_on(tmp_path, dense):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [
        {"id": "a", "prompt": "The open() function", "max_tokens": 5},
        "{not json",
        "[1, 2]",
        {"prompt": "no id"},
        {"id": "b"},
        {"id": "c", "prompt": "x", "max_tokns": 3},
        {"id": "d", "prompt": "x", "temp": -1},
        {"id": "a", "prompt": "a duplicate"},
        {"id": 7, "prompt": "The open() function", "max_tokens": 30, "stop": "called"},
        {"id": "long", "prompt": "word " * 600},
    ])
    summary = batch.run(*dense, batch.prepare(inp, out), {"max_tokens": 8}, progress=False)
    assert summary["written"] == 10 and summary["errors"] == 8
    recs = records(out)
    assert recs[0]["id"] == "a" and len(recs[0]["tokens"]) == 5 and recs[0]["stats"]["mode"]
    assert recs[0]["text"] == generate(*dense, "The open() function", max_tokens=5)["text"]
    errors = {r.get("line"): r["error"] for r in recs if "error" in r}
    assert "not JSON" in errors[2] and "JSON object" in errors[3]
    assert '"id"' in errors[4] and '"prompt"' in errors[5]
    assert "unknown option 'max_tokns'" in errors[6] and "temp must be" in errors[7]
    assert "duplicate id 'a' (first on line 1)" in errors[8]
    assert recs[8]["id"] == 7 and "called" not in recs[8]["text"]
    assert recs[8]["stats"]["finish_reason"] == "stop"
    # Every error record names its input line, a prompt too long for the context included.
    assert recs[9] == {"id": "long", "line": 10, "error": recs[9]["error"]}
    assert "context" in recs[9]["error"]
    # A rerun has nothing left to do.
    plan = batch.prepare(inp, out)
    assert plan.pending == [] and plan.done == 10


def test_retry_errors_reruns_failed_ids_and_only_appends(tmp_path, dense, monkeypatch):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [
        {"id": "a", "prompt": "The open() function", "max_tokens": 4},
        {"id": "b", "prompt": "The fork() call", "max_tokens": 4},
        {"id": "c", "prompt": "x", "max_tokns": 3},
        "{not json",
    ])
    real = batch.generate

    def flaky(model, tokenizer, prompt, **kw):
        if prompt == "The fork() call":
            raise RuntimeError("out of memory on the GPU")  # a transient failure
        return real(model, tokenizer, prompt, **kw)

    monkeypatch.setattr(batch, "generate", flaky)
    batch.run(*dense, batch.prepare(inp, out), progress=False)
    monkeypatch.setattr(batch, "generate", real)
    first = out.read_bytes()
    recs = records(out)
    assert recs[1] == {"id": "b", "line": 2, "error": "out of memory on the GPU"}
    assert [r.get("line") for r in recs] == [None, 2, 3, 4]
    assert batch.prepare(inp, out).pending == []  # without the option errors are final

    rows = inp.read_text().splitlines()
    rows[2] = json.dumps({"id": "c", "prompt": "x", "max_tokens": 3})  # the user fixes line 3
    write_jsonl(inp, rows)
    assert batch.prepare(inp, out).pending == []
    plan = batch.prepare(inp, out, retry_errors=True)
    assert [j.id for j in plan.pending] == ["b", "c"] and plan.done == 2  # not the bad JSON
    summary = batch.run(*dense, plan, progress=False)
    assert summary["written"] == 2 and summary["errors"] == 0
    assert out.read_bytes().startswith(first)  # appended to, never rewritten
    final = {}
    for r in records(out):  # how a reader reads it: a result record counts, else the last error
        if "text" not in final.get(r["id"], {}):
            final[r["id"]] = r
    assert [i for i, r in final.items() if "text" in r] == ["a", "b", "c"]
    assert final["b"]["tokens"] == generate(*dense, "The fork() call", max_tokens=4)["tokens"]
    assert batch.prepare(inp, out, retry_errors=True).pending == []


def test_cli_retry_errors(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": "a", "prompt": "The open() function"}])
    out.write_text(json.dumps({"id": "a", "line": 1, "error": "interrupted"}) + "\n")
    proc = subprocess.run(cmd(inp, out), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "nothing to do" in proc.stderr, proc.stderr
    proc = subprocess.run(cmd(inp, out) + ["--retry-errors", "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["written"] == 1
    recs = records(out)
    assert len(recs) == 2 and recs[0]["error"] == "interrupted" and len(recs[1]["tokens"]) == 16


def test_a_torn_last_line_is_dropped_and_redone(tmp_path, dense):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": i, "prompt": f"The {t} call"} for i, t in enumerate(TOPICS[:3])])
    batch.run(*dense, batch.prepare(inp, out), {"max_tokens": 4}, progress=False)
    good = out.read_text().splitlines(keepends=True)
    out.write_text("".join(good[:2]) + good[2][:25])  # a crash in the middle of a write
    plan = batch.prepare(inp, out)
    assert out.read_text() == "".join(good[:2])
    assert [j.id for j in plan.pending] == [2]
    batch.run(*dense, plan, {"max_tokens": 4}, progress=False)
    before = [json.loads(line) for line in good]
    after = records(out)
    assert [(r["id"], r["text"], r["tokens"]) for r in after] == [
        (r["id"], r["text"], r["tokens"]) for r in before]


def test_refuses_outputs_it_did_not_write(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": 1, "prompt": "x"}])
    out.write_text("hello\nworld\n")
    with pytest.raises(FlashError, match="not a batch output record"):
        batch.prepare(inp, out)
    with pytest.raises(FlashError, match="is the input file"):
        batch.prepare(inp, inp)
    with pytest.raises(FlashError, match="no such file"):
        batch.prepare(tmp_path / "missing.jsonl", out)


def cmd(inp, out):
    return [sys.executable, "-m", "mlx_flash.cli", "batch", str(inp), "--out", str(out),
            "--max-tokens", "16"]


def stop_after(inp, out, lines: int, sig) -> subprocess.CompletedProcess:
    """Run the batch and send `sig` once the output holds `lines` whole lines."""
    proc = subprocess.Popen(cmd(inp, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while whole_lines(out) < lines and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_killed_halfway_and_rerun(tmp_path, dense):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    ids = [f"q{i:02d}" for i in range(20)]
    write_jsonl(inp, [{"id": i, "prompt": f"The {t} system call"} for i, t in zip(ids, TOPICS)])

    ctrl_c = stop_after(inp, out, 5, signal.SIGINT)
    assert ctrl_c.returncode == 130, ctrl_c.stderr
    assert "rerun the same command" in ctrl_c.stderr and "Traceback" not in ctrl_c.stderr
    first = records(out)  # every line whole
    assert 5 <= len(first) < 20

    crash = stop_after(inp, out, len(first) + 3, signal.SIGKILL)
    assert crash.returncode == -signal.SIGKILL
    assert whole_lines(out) < 20

    done = subprocess.run(cmd(inp, out), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr and "tok/s" in done.stderr  # the progress bar
    recs = records(out)
    assert len(recs) == 20 and sorted(r["id"] for r in recs) == ids
    assert all("text" in r and len(r["tokens"]) == 16 for r in recs)
    # Resumed or not, each record is what a single greedy run gives.
    for r in recs[::7]:
        prompt = f"The {TOPICS[ids.index(r['id'])]} system call"
        assert r["tokens"] == generate(*dense, prompt, max_tokens=16)["tokens"]


def test_cli_errors_before_loading(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mlx_flash.cli", "batch",
                           str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.jsonl'}: no such file"]
