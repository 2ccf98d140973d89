"""What a new user hits (issue 17): each bug a regression test, each bad input one line, exit 1."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mlx_flash import load
from mlx_flash.chat import ChatSession
from mlx_flash.convert import convert
from mlx_flash.errors import FlashError
from mlx_flash.generation import generate

from .conftest import EMBEDDED, ROOT

LONG = " ".join(["the open function returns a file descriptor"] * 200)  # ~1,600 tokens


def cli(*args, input=None, text=True):
    return subprocess.run([sys.executable, "-m", "mlx_flash.cli", *args], capture_output=True,
                          text=text, input=input, timeout=300, cwd=ROOT)


def one_line_error(proc, needle: str) -> None:
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode()
    assert proc.returncode == 1, (proc.returncode, err[-2000:])
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err


@pytest.fixture(scope="module")
def flash_dir(tmp_path_factory):
    return convert(str(EMBEDDED), out=tmp_path_factory.mktemp("nu") / "tiny-flash", align=4096,
                   progress=False)


def test_non_utf8_prompt_is_one_line():
    proc = cli("generate", "--prompt", "-", "-n", "3", input=b"The \xff open", text=False)
    one_line_error(proc, "not UTF-8")
    # an argument that is not UTF-8 reaches Python as a lone surrogate
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    proc = subprocess.run([sys.executable, "-m", "mlx_flash.cli", "generate", "-n", "3",
                           "--prompt", b"The \xff".decode("utf-8", "surrogateescape")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    one_line_error(proc, "not UTF-8")


@pytest.mark.parametrize("mode", ["dense", "oracle"])
def test_prompt_longer_than_the_context_is_refused(flash_dir, mode):
    proc = cli("generate", "--model", str(flash_dir), "--memory", "13MiB", "--mode", mode,
               "--max-context", "64", "--prompt", "-", input=LONG)
    one_line_error(proc, "the context holds 64")


def test_max_context_holds_for_a_dense_checkpoint():
    model, tok = load(EMBEDDED, max_context=64)
    with pytest.raises(FlashError, match="the context holds 64"):
        generate(model, tok, LONG, max_tokens=4)
    out = generate(model, tok, "The open() function", max_tokens=200)
    assert out["stats"]["prompt_tokens"] + len(out["tokens"]) <= 64


def test_kv_cache_stays_within_what_the_budget_reserved(flash_dir):
    model, tok = load(flash_dir, memory="13MiB", mode="oracle", max_context=64)
    session = ChatSession(model, tok, max_tokens=16)
    for text in ("What does open() return?", "And close()?", "What is a pipe?"):
        session.reply(text)
    s = session.stats()
    assert 0 < s["kv_cache_bytes"] <= s["kv_cache_reserved_bytes"], s
    assert s["model_memory_bytes"] <= s["memory_budget_bytes"], s


def test_no_bogus_speed_for_nothing_generated(flash_dir):
    from mlx_flash.state import stats_line

    # what `generate` got when the first token was EOS: 0 tokens and a rate from nothing
    line = stats_line({"generation_tokens": 0, "tokens_per_s": 7485.1, "peak_rss_bytes": 1},
                      detail=True)
    assert line.startswith("[0 tokens, mode") and "tok/s" not in line
    proc = cli("perplexity", "--model", str(flash_dir), "--memory", "9MB", "--mode", "oracle",
               "--data", str(ROOT / "README.md"), "--max-tokens", "40", "--seq-len", "20")
    assert proc.returncode == 0, proc.stderr
    assert " 0.0 tok/s" not in proc.stderr and "tok/s" in proc.stderr, proc.stderr


def test_cli_consistency():
    assert cli("-h").returncode == 0 and "Usage" in cli("-h").stdout
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("mlx-flash ")
    proc = cli("generate", "-p", "x", "--repetition-penalty", "0")
    assert proc.returncode == 2 and "must be > 0" in proc.stderr
    help_text = cli("generate", "--help").stdout
    assert "hybrid" in help_text and "<bool>" not in help_text and "Default 4" in help_text
    assert "--model" in cli("perplexity", "--help").stdout


def test_generate_applies_the_chat_template(tmp_path):
    """An instruct tokenizer gets the prompt as a user message; --raw passes it as it is."""
    templated = tmp_path / "templated"
    shutil.copytree(EMBEDDED, templated)
    config = json.loads((templated / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (templated / "tokenizer_config.json").write_text(json.dumps(config))
    out = json.loads(cli("generate", "-m", str(templated), "-p", "hello", "-n", "2",
                         "--json").stdout)
    raw = json.loads(cli("generate", "-m", str(templated), "-p", "hello", "-n", "2", "--raw",
                         "--json").stdout)
    assert out["stats"]["prompt_tokens"] > raw["stats"]["prompt_tokens"]


def test_small_neurons_are_packed_not_padded(tmp_path):
    from mlx_flash import format as fmt
    from mlx_flash import platform

    out = convert(str(EMBEDDED), out=tmp_path / "f", progress=False)
    m = fmt.read_manifest(out)
    # opt-tiny: 2 x 192 fp16 values = 768 bytes a neuron, packed back to back in direct-I/O
    # blocks instead of each padded to one (81% of the file would be zeros)
    assert m.packed and m.record_bytes == m.payload_bytes == 768
    assert m.alignment == platform.direct_io_alignment()
    assert fmt.info(out)["padding_fraction"] <= 0.125


def _flip(file, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def test_verify_catches_a_flipped_byte_in_each_file(tmp_path):
    from mlx_flash import calibrate
    from mlx_flash import format as fmt

    from .conftest import CORPUS

    base = convert(str(EMBEDDED), out=tmp_path / "base", align=4096, progress=False)
    calibrate.calibrate(base, CORPUS / "fixture-calib.txt", tokens=1024, ranks=8,
                        progress=False)
    ok = cli("verify", str(base), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] and fmt.info(base)["verified"]
    assert fmt.info(base)["calibrated"] and fmt.info(base)["checksums"]
    m = fmt.read_manifest(base)
    for name, offset in (("ffn.bundles", 16484), ("ffn.bundles", m.ffn_bytes - 1),
                         ("resident.safetensors", m.resident_bytes // 2),
                         ("predictors.safetensors", 300)):
        bad = tmp_path / f"bad-{name}-{offset}"
        shutil.copytree(base, bad)
        before = (bad / "manifest.json").read_bytes()
        _flip(bad / name, offset)
        proc = cli("verify", str(bad))
        one_line_error(proc, f"{name}")
        assert "checksum mismatch" in proc.stderr
        assert (bad / "manifest.json").read_bytes() == before  # a failed check writes nothing


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounts a tmpfs")
@pytest.mark.parametrize("room", ["none", "scratch only"])
def test_calibrate_on_a_full_disk_is_one_line_and_changes_nothing(tmp_path, flash_dir, room):
    """No room at all: refused before any work. Room for the scratch files but not for the
    predictors: MLX's write error (a RuntimeError) becomes one line, the dir unchanged."""
    from mlx_flash import format as fmt

    from .conftest import CORPUS

    m = fmt.read_manifest(flash_dir)
    # 512 tokens of scratch files (~1 MB) hold less than rank-192 predictors (~1.5 MB)
    scratch = 512 * (2 * m.d_model * 4 + m.ffn_dim // 8) + m.num_layers * m.ffn_dim * 64
    used = sum(f.stat().st_size for f in flash_dir.iterdir())
    size = used + (16 << 10) + (scratch if room == "scratch only" else 0)
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        model = shutil.copytree(flash_dir, mnt / "m")
        before = {f.name: f.read_bytes() for f in model.iterdir()}
        proc = cli("calibrate", str(model), "--data", str(CORPUS / "fixture-calib.txt"),
                   "--tokens", "512", "--rank", "192", "--holdout", "none")
        one_line_error(proc, "scratch space" if room == "none" else "disk full")
        assert {f.name: f.read_bytes() for f in model.iterdir()} == before
    finally:
        subprocess.run(["umount", str(mnt)])
