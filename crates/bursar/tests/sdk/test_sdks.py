"""The official OpenAI and Anthropic Python SDKs as real clients of a running Bursar
(proxy mode, simulated provider). Run by tests/sdk.rs: python3 test_sdks.py BASE_URL.

Each check asserts through the SDK's own types and exceptions; the first failure
raises and the script exits non-zero with the failing check named.
"""

import sys

import anthropic
import openai

BASE = sys.argv[1]
MEMBER = "bsr_sdk_member_key_00000000000000"
LIMITED = "bsr_sdk_limited_key_0000000000000"
BROKE = "bsr_sdk_broke_key_000000000000000"

MESSAGES = [{"role": "user", "content": "Say something about budgets."}]


def oa(key):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key=key, max_retries=0)


def an(key):
    return anthropic.Anthropic(base_url=BASE, api_key=key, max_retries=0)


def openai_chat():
    raw = oa(MEMBER).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=50
    )
    r = raw.parse()
    assert r.choices[0].message.content.startswith("Yes"), r
    assert r.usage.completion_tokens == 20, r.usage
    assert r.usage.prompt_tokens > 0, r.usage
    assert float(raw.headers["x-bursar-cost"]) > 0, raw.headers
    assert raw.headers["x-bursar-authorization-id"], raw.headers


def openai_stream():
    stream = oa(MEMBER).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=50, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("Yes") and text.endswith("."), text
    # With include_usage the client gets the usage chunk too.
    stream = oa(MEMBER).chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        max_tokens=50,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 20, usage


def openai_embeddings():
    r = oa(MEMBER).embeddings.create(
        model="text-embedding-3-small", input=["one two three", "four"]
    )
    assert len(r.data) == 2, r
    assert len(r.data[0].embedding) == 8, r.data[0]
    assert r.usage.prompt_tokens == 4, r.usage


def openai_models():
    ids = [m.id for m in oa(MEMBER).models.list()]
    assert "gpt-4o-mini" in ids and "claude-3-opus" not in ids, ids


def openai_402():
    try:
        oa(BROKE).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=50
        )
    except openai.APIStatusError as e:
        assert e.status_code == 402, e
        assert e.code == "budget_exceeded", e.body
        return
    raise AssertionError("no 402")


def openai_429():
    c = oa(LIMITED)
    for _ in range(2):
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    try:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    except openai.RateLimitError as e:
        assert e.code == "rate_limited", e.body
        assert int(e.response.headers["retry-after"]) >= 1, e.response.headers
        return
    raise AssertionError("no 429")


def openai_403():
    try:
        oa(MEMBER).chat.completions.create(
            model="gpt-4.5-preview", messages=MESSAGES, max_tokens=5
        )
    except openai.PermissionDeniedError as e:
        assert e.code == "model_class_not_allowed", e.body
        return
    raise AssertionError("no 403")


def anthropic_messages():
    r = an(MEMBER).messages.create(
        model="claude-3-5-haiku-20241022", max_tokens=50, messages=MESSAGES
    )
    assert r.content[0].text.startswith("Yes"), r
    assert r.usage.output_tokens == 20, r.usage


def anthropic_stream():
    with an(MEMBER).messages.stream(
        model="claude-3-5-haiku-20241022", max_tokens=50, messages=MESSAGES
    ) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text.startswith("Yes"), text
    assert final.usage.output_tokens == 20, final.usage


def anthropic_errors():
    try:
        an(BROKE).messages.create(
            model="claude-3-5-haiku-20241022", max_tokens=50, messages=MESSAGES
        )
        raise AssertionError("no 402")
    except anthropic.APIStatusError as e:
        assert e.status_code == 402, e
        assert e.body["error"]["code"] == "budget_exceeded", e.body
    try:
        an(MEMBER).messages.create(model="claude-3-opus", max_tokens=5, messages=MESSAGES)
        raise AssertionError("no 403")
    except anthropic.PermissionDeniedError as e:
        assert e.body["error"]["code"] == "model_class_not_allowed", e.body
    try:
        an(LIMITED).messages.create(
            model="claude-3-5-haiku-20241022", max_tokens=5, messages=MESSAGES
        )
        raise AssertionError("no 429")
    except anthropic.RateLimitError as e:
        assert e.body["error"]["code"] == "rate_limited", e.body
        assert int(e.response.headers["retry-after"]) >= 1


def openai_sdk_reaches_claude():
    # /v1/chat/completions → an Anthropic provider: translated both ways.
    messages = [{"role": "system", "content": "be brief"}] + MESSAGES
    r = oa(MEMBER).chat.completions.create(
        model="claude-haiku-4-5", messages=messages, max_tokens=50
    )
    assert r.object == "chat.completion", r
    assert r.choices[0].message.content.startswith("Yes"), r
    assert r.choices[0].finish_reason == "stop", r
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens > 0, r.usage
    stream = oa(MEMBER).chat.completions.create(
        model="claude-haiku-4-5",
        messages=messages,
        max_tokens=50,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Yes") and text.endswith("."), text
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 16, usage


def anthropic_sdk_reaches_openai_models():
    # /v1/messages → an OpenAI-style provider: translated both ways.
    r = an(MEMBER).messages.create(
        model="gpt-4.1-nano", max_tokens=50, system="be brief", messages=MESSAGES
    )
    assert r.type == "message" and r.role == "assistant", r
    assert r.content[0].text.startswith("Yes"), r
    assert r.stop_reason == "end_turn", r
    assert r.usage.output_tokens == 16 and r.usage.input_tokens > 0, r.usage
    with an(MEMBER).messages.stream(
        model="gpt-4.1-nano", max_tokens=50, messages=MESSAGES
    ) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text.startswith("Yes") and text.endswith("."), text
    assert final.content[0].text == text, final
    assert final.usage.output_tokens == 16, final.usage
    assert final.usage.input_tokens > 0, final.usage


CHECKS = [
    openai_chat,
    openai_stream,
    openai_embeddings,
    openai_models,
    openai_402,
    openai_429,
    openai_403,
    anthropic_messages,
    anthropic_stream,
    anthropic_errors,
    openai_sdk_reaches_claude,
    anthropic_sdk_reaches_openai_models,
]

if __name__ == "__main__":
    for check in CHECKS:
        try:
            check()
        except Exception as e:  # noqa: BLE001 - report which check failed, then fail
            print(f"FAILED {check.__name__}: {type(e).__name__}: {e}")
            sys.exit(1)
        print(f"ok {check.__name__}")
    print(f"all {len(CHECKS)} SDK checks passed "
          f"(openai {openai.__version__}, anthropic {anthropic.__version__})")
