"""`mlx-flash serve`: the real server in a subprocess, driven by the official `openai` client."""

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from mlx_flash import generate, load
from mlx_flash.chat import PLAIN_STOP, ChatSession
from mlx_flash.convert import convert

from .conftest import EMBEDDED, ROOT

# naive: every token reads the whole FFN in one order, so a greedy reply does not depend on the
# requests before it (oracle mode's neuron cache changes the FFN sum's rounding with its history,
# enough to flip a near tie: "The pipe() system call" after the others, in 3 of 6 random orders).
FLASH = ["--memory", "8.5MB", "--max-context", "256", "--mode", "naive"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
NAMES = ["open", "close", "read", "write", "fork", "pipe", "kill", "exec"]


class Server:
    """`mlx-flash serve` on a free loopback port, its stderr in a file."""

    def __init__(self, model, *args, log):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_flash.cli", "serve", "--model", str(model), "--port", "0",
             *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        for _ in range(600):  # up to 60 s for the imports and the load
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log.read_text())
            if found or self.proc.poll() is not None:
                break
            time.sleep(0.1)
        assert found, log.read_text()
        self.url = found.group(1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                                    timeout=120)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> str:
        """Ctrl-C; the server's stderr once it has exited."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)
        return self.log.read_text()


@pytest.fixture(scope="module")
def flash_dir(tmp_path_factory):
    return convert(str(EMBEDDED), out=tmp_path_factory.mktemp("serve") / "tiny-flash", align=4096,
                   progress=False)


@pytest.fixture(scope="module")
def server(flash_dir, tmp_path_factory):
    s = Server(flash_dir, *FLASH, log=tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    log = s.stop()
    assert "Traceback" not in log and log.rstrip().endswith("server stopped")


@pytest.fixture(scope="module")
def local(flash_dir):
    """The same flash dir loaded in this process: the replies the server must give."""
    return load(flash_dir, memory="8.5MB", max_context=256, mode="naive")


def complete(server, prompt: str, max_tokens: int = 10) -> str:
    return server.client.completions.create(model="tiny-flash", prompt=prompt,
                                            max_tokens=max_tokens, temperature=0).choices[0].text


def test_health_and_models(server):
    health = server.get("/health")
    assert health["status"] == "ok" and health["mode"] == "naive"
    assert health["memory_budget_bytes"] == 8_500_000 and health["max_context"] == 256
    assert health["peak_rss_bytes"] >= health["rss_bytes"] > 0
    assert [m.id for m in server.client.models.list()] == ["tiny-flash"]


def test_plain_completion_equals_generate(server, local):
    raw = server.client.completions.with_raw_response.create(
        model="tiny-flash", prompt="The open() function", max_tokens=12, temperature=0)
    reply = raw.parse()
    expected = generate(*local, "The open() function", max_tokens=12)
    assert reply.choices[0].text == expected["text"]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == expected["stats"]["prompt_tokens"]
    assert reply.usage.completion_tokens == 12
    stats = json.loads(raw.headers["X-Flash-Stats"])
    assert stats == reply.model_extra["x_flash"]
    assert stats["flash_bytes_per_token"] > 0 and stats["memory_budget_bytes"] == 8_500_000


def test_streamed_chat_uses_plain_turns_without_a_template(server, local):
    messages = [{"role": "system", "content": "You explain Unix."},
                {"role": "user", "content": "What does fork() do?"}]
    chunks = list(server.client.chat.completions.create(
        model="tiny-flash", messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].model_extra["x_flash"]["flash_bytes_per_token"] > 0
    stats = final[0].model_extra["x_flash"]
    assert chunks[-1].usage.completion_tokens == stats["completion_tokens"]
    # chat.py's plain "User:/Assistant:" rendering, and its turn-ending stops
    tokens = ChatSession(*local).render([{"role": "user", "content": "What does fork() do?"}])
    session = ChatSession(*local, system="You explain Unix.")
    expected = generate(*local, session.render(messages[1:]), max_tokens=16, stop=PLAIN_STOP)
    assert text == expected["text"] and text
    assert chunks[-1].usage.prompt_tokens == len(session.render(messages[1:])) > len(tokens)
    whole = server.client.chat.completions.create(model="tiny-flash", messages=messages,
                                                  max_tokens=16, temperature=0)
    assert whole.choices[0].message.content == text


def test_eight_concurrent_clients_each_get_their_own_reply(server):
    prompts = [f"The {name}() system call" for name in NAMES]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: complete(server, p), prompts))
    alone = [complete(server, p) for p in prompts]
    assert together == alone
    assert len(set(alone)) > 1  # different prompts, different replies: none mixed up


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server):
    status, body = server.post("/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    for fields, param in [({"max_tokens": "ten"}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
                          ({"temperature": "hot"}, "temperature"), ({"stop": 3}, "stop"),
                          ({"messages": "hi"}, "messages"), ({"stream": "yes"}, "stream")]:
        body = {"messages": [{"role": "user", "content": "hi"}], **fields}
        status, err = server.post("/v1/chat/completions", json.dumps(body).encode())
        assert status == 400 and err["error"]["param"] == param, (fields, err)
    status, err = server.post("/v1/completions", b'{"prompt": [1, "x"]}')
    assert status == 400 and err["error"]["param"] == "prompt"
    with pytest.raises(openai.NotFoundError, match="model_not_found|not served"):
        server.client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model="tiny-flash", prompt="hi", max_tokens=0)
    assert complete(server, "The read() function", 3)


def test_a_prompt_longer_than_the_context_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="tiny-flash", prompt="word " * 300, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "context holds 256" in str(e.value)
    assert complete(server, "The read() function", 3)


def test_a_client_gone_mid_stream_stops_its_generation(server):
    before = server.get("/health")["requests"]
    port = int(server.url.rsplit(":", 1)[1])
    body = json.dumps({"prompt": "The open() function", "max_tokens": 200, "temperature": 0,
                       "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        seen = b""
        for _ in range(100):
            seen += sock.recv(4096)
            if seen.count(b"data: ") >= 3:
                break
    assert seen.startswith(b"HTTP/1.0 200") and seen.count(b"data: ") >= 3
    assert complete(server, "The read() function", 3)  # served once the cancelled one stops
    after = server.get("/health")["requests"]
    assert after["cancelled"] == before["cancelled"] + 1  # stopped before its 200 tokens


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """A copy of the embedded (dense HF) model whose tokenizer has a chat template."""
    path = shutil.copytree(EMBEDDED, tmp_path_factory.mktemp("serve") / "tiny-chat")
    config = path / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": TEMPLATE}))
    return path


def test_chat_template_and_clean_ctrl_c(templated, tmp_path):
    server = Server(templated, "--max-context", "256", log=tmp_path / "server.log")
    try:
        assert server.get("/health")["memory_budget_bytes"] is None  # a dense HF dir
        messages = [{"role": "user", "content": "What does fork() do?"}]
        reply = server.client.chat.completions.create(model="tiny-chat", messages=messages,
                                                      max_tokens=8, temperature=0)
        model, tokenizer = load(templated)
        tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        expected = generate(model, tokenizer, list(tokens), max_tokens=8)
        assert reply.usage.prompt_tokens == len(tokens)
        assert reply.choices[0].message.content == expected["text"]
        stream = server.client.completions.create(model="tiny-chat", prompt="The open() function",
                                                  max_tokens=200, temperature=0, stream=True)
        assert next(iter(stream)).choices[0].text is not None  # a reply under way
        tic = time.monotonic()
    finally:
        log = server.stop()
    assert time.monotonic() - tic < 15
    assert server.proc.returncode == 0 and "Traceback" not in log
    assert log.rstrip().splitlines()[-1] == "server stopped"


def test_a_client_gone_before_its_whole_answer_stops_the_generation(server):
    """A non-streamed request whose client hangs up: nothing is written to it until the end, so
    the server watches its socket and cancels the generation at the next token."""
    before = server.get("/health")["requests"]
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "The open() function", "max_tokens": 250,
                       "temperature": 0}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.5)  # the generation has begun
    for _ in range(100):
        after = server.get("/health")["requests"]
        if after["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.1)
    assert after["cancelled"] == before["cancelled"] + 1 and after["served"] == before["served"]
