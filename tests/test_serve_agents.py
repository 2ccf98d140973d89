"""`mlx-flash serve` for coding agents: kept prompt caches, tool calls, reasoning, the Anthropic
Messages API and the API key, through the real `openai` and `anthropic` clients."""

import anthropic
import openai
import pytest

from mlx_flash.convert import convert
from mlx_flash.loader import load_tokenizer
from mlx_flash.toolcalls import Splitter

from .agent_model import CALL, write_agent_model
from .test_serve import Server

KEY = "s3cret-key"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "The weather in a city",
                    "input_schema": {"type": "object",
                                     "properties": {"city": {"type": "string"}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory):
    return write_agent_model(tmp_path_factory.mktemp("agent") / "hf")


@pytest.fixture(scope="module")
def server(agent_dir):
    work = agent_dir.parent
    flash = convert(str(agent_dir), out=work / "agent-flash", align=4096, progress=False)
    s = Server(flash, "--memory", "6MB", "--max-context", "256", "--prompt-caches", "2",
               "--api-key", KEY, log=work / "server.log")
    s.client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    s.anthropic = anthropic.Anthropic(base_url=s.url, api_key=KEY, max_retries=0, timeout=120)
    yield s
    log = s.stop()
    assert "Traceback" not in log and log.rstrip().endswith("server stopped")
    # one line a generation: its prompt, what came from a kept cache, the timings
    assert "anthropic chat:" in log and "cached)," in log


def test_the_budget_reserves_each_kept_prompt_cache(server):
    health = server.get("/health")
    assert health["prompt_caches_max"] == 2 and health["memory_budget_bytes"] == 6_000_000
    # two contexts of KV cache: 2 layers x 256 tokens x 2 (k, v) x 2 heads x 16 x 4 bytes, twice
    assert health["kv_cache_reserved_bytes"] == 2 * 2 * 256 * 2 * 2 * 16 * 4


def test_openai_tool_call_round_trip_reuses_the_first_turn(server):
    first = server.client.chat.completions.create(model="agent-flash", messages=ASK,
                                                  tools=TOOLS, max_tokens=40, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "Paris"}' and call.id.startswith("call_")
    assert choice.message.model_extra["reasoning_content"] == "Checking"
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "18 C, sun"}]
    second = server.client.chat.completions.create(model="agent-flash", messages=history,
                                                   tools=TOOLS, max_tokens=40, temperature=0)
    assert second.choices[0].message.content == "Sunny in Paris"
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    # the first turn's prompt came from the kept cache: only the call and the result prefilled
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    assert second.model_extra["x_flash"]["prefilled_tokens"] == (
        second.usage.prompt_tokens - cached)


def test_openai_streamed_tool_call(server):
    chunks = list(server.client.chat.completions.create(
        model="agent-flash", messages=ASK, tools=TOOLS, max_tokens=40, temperature=0,
        stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert [(tc.index, tc.function.name, tc.function.arguments) for tc in calls] == [
        (0, "get_weather", '{"city": "Paris"}')]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "Checking"
    assert "".join(d.content or "" for d in deltas) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_the_call_stays_text(server):
    reply = server.client.chat.completions.create(model="agent-flash", messages=ASK,
                                                  max_tokens=40, temperature=0)
    assert reply.choices[0].message.content == f"<tool_call>{CALL}</tool_call>"
    assert reply.choices[0].finish_reason == "stop"


def test_three_turns_prefill_only_their_new_tokens(server):
    messages, cached, prompts = [], [], []
    for turn in ("Hello", "And tomorrow?", "Thanks"):
        messages.append({"role": "user", "content": turn})
        reply = server.client.chat.completions.create(model="agent-flash", messages=messages,
                                                      max_tokens=40, temperature=0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        prompts.append(reply.usage.prompt_tokens)
    # each later turn found the earlier conversation in a kept cache
    assert cached[1] >= prompts[0] and cached[2] >= prompts[1]
    assert prompts[2] - cached[2] < prompts[2] - prompts[1] + 12


def test_anthropic_messages_tool_use_round_trip(server):
    first = server.anthropic.messages.create(model="agent-flash", max_tokens=40, messages=ASK,
                                             tools=ANTHROPIC_TOOLS, system="Be brief.")
    assert first.type == "message" and first.role == "assistant"
    assert first.stop_reason == "tool_use"
    kinds = [b.type for b in first.content]
    assert kinds == ["thinking", "tool_use"]
    use = first.content[1]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    assert first.content[0].thinking == "Checking"
    assert first.usage.output_tokens > 0 and first.usage.input_tokens > 0
    second = server.anthropic.messages.create(
        model="agent-flash", max_tokens=40, system="Be brief.", tools=ANTHROPIC_TOOLS,
        messages=ASK + [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                        {"role": "user", "content": [{"type": "tool_result",
                                                      "tool_use_id": use.id,
                                                      "content": "18 C, sun"}]}])
    assert [b.type for b in second.content] == ["text"]
    assert second.content[0].text == "Sunny in Paris" and second.stop_reason == "end_turn"
    assert second.usage.cache_read_input_tokens >= first.usage.input_tokens


def test_anthropic_streamed_equals_whole(server):
    args = dict(model="agent-flash", max_tokens=40, messages=ASK, tools=ANTHROPIC_TOOLS)
    whole = server.anthropic.messages.create(**args)
    with server.anthropic.messages.stream(**args) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    def blocks(message):
        return [{k: v for k, v in b.model_dump().items() if k != "id"} for b in message.content]

    assert blocks(final) == blocks(whole) and final.content[1].id.startswith("toolu_")
    assert final.stop_reason == whole.stop_reason == "tool_use"
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert events.count("content_block_start") == 2


def test_anthropic_stop_sequence_and_max_tokens(server):
    history = ASK + [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "18 C"}]}]
    stopped = server.anthropic.messages.create(model="agent-flash", max_tokens=40,
                                               messages=history, stop_sequences=[" Paris"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == " Paris"
    assert stopped.content[0].text == "Sunny in"
    cut = server.anthropic.messages.create(model="agent-flash", max_tokens=1, messages=history)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 1


def test_api_key_and_errors_in_each_api_shape(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="agent-flash", messages=ASK, max_tokens=4)
    assert e.value.status_code == 401 and "invalid API key" in str(e.value)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(model="agent-flash", max_tokens=4, messages=ASK)
    assert e.value.body["error"]["type"] == "authentication_error"
    assert server.get("/health")["status"] == "ok"  # liveness needs no key
    with pytest.raises(anthropic.BadRequestError) as e:
        server.anthropic.messages.create(model="agent-flash", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image", "source": {}}]}])
    assert e.value.body == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "messages.0.content[0]: unsupported content block 'image' for a user "
                   "message (text, tool_use, tool_result)"}}
    with pytest.raises(anthropic.NotFoundError):
        server.anthropic.messages.create(model="gpt-9", max_tokens=4, messages=ASK)
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="agent-flash", messages=ASK, tools=TOOLS,
                                              tool_choice="required", max_tokens=4)
    assert e.value.body["param"] == "tool_choice"


def test_markers_split_across_pieces(agent_dir):
    """The reply streamed a character at a time: markers cut anywhere are held until whole;
    a span the parser cannot read stays text; an unclosed call at the end is still parsed."""
    tok = load_tokenizer(agent_dir)
    text = f"<think>Checking</think>Calling.<tool_call>{CALL}</tool_call><tool_call>nope"
    split = Splitter(tok, TOOLS)
    events = [e for ch in text + "</tool_call> done <tool_" for e in split.feed(ch)]
    events += split.finish()
    merged = []
    for kind, value in events:
        if merged and kind != "tool_call" and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + value)
        else:
            merged.append((kind, value))
    assert [k for k, _ in merged] == ["reasoning", "text", "tool_call", "text"]
    assert merged[0][1] == "Checking" and merged[1][1] == "Calling."
    assert {k: v for k, v in merged[2][1].items() if k != "id"} == {
        "name": "get_weather", "arguments": {"city": "Paris"}}
    assert merged[3][1] == "<tool_call>nope</tool_call> done <tool_"
    unclosed = Splitter(tok, TOOLS)
    got = unclosed.feed(f"<tool_call>{CALL}") + unclosed.finish()
    assert [(k, v["name"]) for k, v in got] == [("tool_call", "get_weather")]
    plain = Splitter(tok, None)  # no tools: calls stay text, reasoning still apart
    got = plain.feed(f"<think>a</think><tool_call>{CALL}</tool_call>") + plain.finish()
    assert got[0] == ("reasoning", "a") and "".join(v for k, v in got[1:]) == (
        f"<tool_call>{CALL}</tool_call>")
