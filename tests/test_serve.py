"""The OpenAI-compatible server: a real uvicorn server on a free localhost port, the official `openai` client.

Tiny random target (SmolLM2's tokenizer and template) with a random draft; one slow test on SmolLM2 itself.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from conftest import ROOT
from helpers.engine import random_draft
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dovetail_infer import Dovetail, InferConfig
from dovetail_infer.serve import ServerSettings, ServerThread, create_app

pytestmark = pytest.mark.usefixtures("one_thread")
INFER = InferConfig(budget=6, depth=4, top_k=2)
MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def engine(tiny_target) -> Dovetail:
    return Dovetail(tiny_target, random_draft(tiny_target, depth=1), "cpu")


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, INFER, ServerSettings(max_tokens=12, queue_size=8, max_body_bytes=64 * 1024))
    with ServerThread(app) as s:
        s.state = app.state.server
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _health(url: str) -> dict:
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    return r.json()


def _metric(url: str, line_start: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


def _records(state, n: int, start: int = 0) -> list[dict]:
    """The scheduler's records of finished jobs from `start`, once there are `n` of them."""
    deadline = time.monotonic() + 10
    while len(state.scheduler.finished) < start + n and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(state.scheduler.finished)[start:]


def _streamed(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _text(target, ids: list[int]) -> str:
    ids = [t for t in ids if t not in set(target.eos_ids)]
    return target.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_greedy_stream_equals_whole_equals_chat_equals_target_only(server, client, engine, tiny_target):
    whole = client.chat.completions.create(model="dovetail", messages=MESSAGES, max_tokens=40)
    chunks = list(
        client.chat.completions.create(
            model="dovetail", messages=MESSAGES, max_tokens=40, stream=True, stream_options={"include_usage": True}
        )
    )
    ref = engine.chat(MESSAGES, max_tokens=40, infer=INFER)
    target_only = Dovetail(tiny_target, None, "cpu").chat(MESSAGES, max_tokens=40, infer=INFER)
    assert len(ref.text) > 20
    assert _streamed(chunks) == whole.choices[0].message.content == ref.text == target_only.text
    assert whole.choices[0].finish_reason == ref.finish_reason
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    for usage in (whole.usage, chunks[-1].usage):  # include_usage: the last chunk carries usage, no choices
        assert (usage.prompt_tokens, usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
        assert usage.total_tokens == ref.prompt_tokens + ref.completion_tokens
    stats = whole.model_extra["dovetail"]
    assert stats["draft"] is True and stats["forwards"] == ref.forwards and stats["tau"] == round(ref.tau, 4)
    assert stats["tokens_per_s"] > 0
    assert chunks[0].choices[0].delta.role == "assistant"

    # raw completions: the prompt's own tokens, no chat template
    prompt = "Once upon a time"
    done = client.completions.create(model="dovetail", prompt=prompt, max_tokens=10)
    parts = list(client.completions.create(model="dovetail", prompt=prompt, max_tokens=10, stream=True))
    ids = tiny_target.tokenizer.encode(prompt)
    base = engine.generate_baseline(ids, InferConfig(max_new_tokens=10))
    assert "".join(c.choices[0].text for c in parts) == done.choices[0].text == _text(tiny_target, base.output_ids)
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == len(base.output_ids)

    models = client.models.list()
    assert [m.id for m in models.data] == ["dovetail"]
    assert _metric(server.url, 'dovetail_requests_total{code="200",endpoint="/v1/chat/completions"}') >= 2
    assert _metric(server.url, "dovetail_completion_tokens_total") >= 2 * ref.completion_tokens
    assert _metric(server.url, "dovetail_time_to_first_token_seconds_count") >= 4


def test_eight_concurrent_clients_each_get_their_own_reply(server, client, engine):
    topics = [
        "cats",
        "the moon",
        "Paris in spring",
        "prime numbers",
        "why the sky is blue",
        "a haiku",
        "1 2 3 4",
        "crêpes",
    ]
    prompts = [[{"role": "user", "content": f"Tell me about {t}"}] for t in topics]
    solo = [engine.chat(m, max_tokens=16, infer=INFER).text for m in prompts]  # the server is idle meanwhile
    assert len(set(solo)) == 8

    def ask(i: int) -> str:
        if i % 2:
            return (
                client.chat.completions.create(model="d", messages=prompts[i], max_tokens=16).choices[0].message.content
            )
        return _streamed(client.chat.completions.create(model="d", messages=prompts[i], max_tokens=16, stream=True))

    before = len(server.state.scheduler.finished)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    assert replies == solo
    records = list(server.state.scheduler.finished)[before:]
    assert [r["outcome"] for r in records] == ["done"] * 8
    # the worker thread decodes with the torch thread count of the thread that built the app (ATen sets each new
    # thread up from the count torch.set_num_threads last set)
    assert {r["torch_threads"] for r in records} == {torch.get_num_threads()}
    # one decodes at a time: the last to start waited for at least one other's whole decoding
    assert max(r["queue_s"] for r in records) >= min(r["decode_s"] for r in records)
    assert _health(server.url)["queue"] == 0


def test_a_client_that_disconnects_mid_stream_frees_the_engine(server, client):
    cancelled_before = _metric(server.url, 'dovetail_requests_total{code="499"')
    before = len(server.state.scheduler.finished)
    stream = client.chat.completions.create(model="d", messages=MESSAGES, max_tokens=1500, stream=True)
    chunks = iter(stream)
    for _ in range(4):  # the role chunk, then text: decoding is under way
        next(chunks)
    stream.close()
    t0 = time.monotonic()
    nxt = client.chat.completions.create(model="d", messages=MESSAGES, max_tokens=4)
    assert time.monotonic() - t0 < 5  # 1500 tokens would take far longer
    assert nxt.choices[0].message.content and nxt.model_extra["dovetail"]["queue_s"] < 2
    gone, after = list(server.state.scheduler.finished)[before:]
    assert gone["outcome"] == "cancelled" and after["outcome"] == "done"
    assert 3 <= gone["tokens"] < 1500
    assert gone["steps_after_cancel"] <= 1  # stopped within one decoding step of the server noticing
    assert _metric(server.url, 'dovetail_requests_total{code="499"') == cancelled_before + 1
    _health(server.url)


def test_a_non_streaming_client_that_goes_away_is_cancelled_too(server, client):
    before = len(server.state.scheduler.finished)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(server.url + CHAT, json={"messages": MESSAGES, "max_tokens": 1500}, timeout=0.5)
    (gone,) = _records(server.state, 1, before)
    assert gone["outcome"] == "cancelled" and gone["tokens"] < 1500
    assert client.chat.completions.create(model="d", messages=MESSAGES, max_tokens=2).usage.completion_tokens == 2


def _body(**fields) -> bytes:
    return json.dumps({"model": "d", "messages": MESSAGES, **fields}).encode()


def _msgs(*messages) -> bytes:
    return json.dumps({"model": "d", "messages": list(messages)}).encode()


BAD = [  # (body, param the error must name, error code)
    (b'{"model": "d", "messages": [', None, "invalid_json"),
    (b'{"model": "d", "messages": "\xff\xfe"}', None, "invalid_encoding"),
    (b"[1, 2]", None, "invalid_json"),
    (b"[" * 60_000, None, "invalid_json"),  # nested past the recursion limit
    (b'{"model": "d"}', "messages", "missing_required_parameter"),
    (_body(messages="hi"), "messages", "invalid_type"),
    (_body(messages=[]), "messages", "invalid_value"),
    (_body(messages=["hi"]), "messages[0]", "invalid_type"),
    (_msgs({"role": "robot", "content": "hi"}), "messages[0].role", "invalid_value"),
    (_msgs({"content": "hi"}), "messages[0].role", "invalid_value"),
    (_msgs({"role": "user", "content": 3}), "messages[0].content", "invalid_type"),
    (_msgs({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}), "messages[0].content[0]", None),
    (_msgs({"role": "user", "content": "  "}), "messages", "invalid_value"),
    (_msgs({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}), "messages", "invalid_value"),
    (_body(max_tokens=0), "max_tokens", "invalid_value"),
    (_body(max_tokens=-3), "max_tokens", "invalid_value"),
    (_body(max_tokens="10"), "max_tokens", "invalid_type"),
    (_body(max_tokens=1.5), "max_tokens", "invalid_type"),
    (_body(max_tokens=True), "max_tokens", "invalid_type"),
    (_body(max_completion_tokens=0), "max_completion_tokens", "invalid_value"),
    (_body(max_tokens=5000), "max_tokens", "context_length_exceeded"),
    (_body(messages=[{"role": "user", "content": "word " * 3000}]), "messages", "context_length_exceeded"),
    (_body(temperature="hot"), "temperature", "invalid_type"),
    (_body(temperature=-1), "temperature", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature", "invalid_value"),
    (_body(top_p=0), "top_p", "invalid_value"),
    (_body(top_p=1.5), "top_p", "invalid_value"),
    (_body(stop=""), "stop", "invalid_value"),
    (_body(stop=["ok", 1]), "stop", "invalid_value"),
    (_body(stream="yes"), "stream", "invalid_type"),
    (_body(stream_options="x"), "stream_options", "invalid_type"),
    (_body(n=2), "n", "unsupported_value"),
    (_body(seed=-1), "seed", "invalid_value"),
    (_body(model=3), "model", "invalid_type"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages", None),  # a lone surrogate
]


def test_each_bad_request_gets_a_400_naming_the_field_and_the_server_stays_healthy(server, client):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for body, param, code in BAD:
            r = http.post(CHAT, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (body[:80], r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error", (body[:80], err)
            assert code is None or err["code"] == code, (body[:80], err)
            if param:
                assert param.split("[")[0] in err["message"]
        for prompt, code in ((None, "missing_required_parameter"), (5, "invalid_type"), ("", "invalid_value")):
            r = http.post("/v1/completions", json={"model": "d", "prompt": prompt})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
            assert r.json()["error"]["code"] == code
        big = http.post(CHAT, content=_body(messages=[{"role": "user", "content": "x" * 70_000}]))
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        assert http.get("/nowhere").status_code == 404 and "error" in http.get("/nowhere").json()
        assert http.get(CHAT).status_code == 405
    with pytest.raises(openai.BadRequestError) as e:  # the official client sees the same error shape
        client.chat.completions.create(model="d", messages=[{"role": "robot", "content": "hi"}])
    assert e.value.param == "messages[0].role"
    _health(server.url)
    assert client.chat.completions.create(model="d", messages=MESSAGES, max_tokens=3).choices[0].message.content
    assert _metric(server.url, 'dovetail_requests_total{code="500"') == 0


def test_a_full_queue_answers_429_with_retry_after(tiny_target):
    app = create_app(Dovetail(tiny_target, None, "cpu"), INFER, ServerSettings(queue_size=1, max_tokens=4))
    with ServerThread(app) as s, ThreadPoolExecutor(1) as pool:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        long = client.chat.completions.create(model="d", messages=MESSAGES, max_tokens=1500, stream=True)
        chunks = iter(long)
        next(chunks), next(chunks)  # decoding
        waiting = pool.submit(client.chat.completions.create, model="d", messages=MESSAGES, max_tokens=4)
        deadline = time.monotonic() + 20
        while _health(s.url)["queue"] < 1:
            assert time.monotonic() < deadline and not waiting.done()
            time.sleep(0.01)
        r = httpx.post(s.url + CHAT, content=_body(max_tokens=4), timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="d", messages=MESSAGES, max_tokens=4)
        assert _metric(s.url, "dovetail_queue_length") == 1
        long.close()
        assert waiting.result(timeout=30).choices[0].finish_reason == "length"  # served once the engine was free
        assert _metric(s.url, 'dovetail_requests_total{code="429"') == 2
        _health(s.url)


def test_given_an_executor_the_server_decodes_on_the_thread_that_built_the_engine(tiny_target):
    """run_server loads the engine on a one-thread executor and decodes there too (one OpenMP pool per process)."""
    with ThreadPoolExecutor(1, thread_name_prefix="torch-owner") as owner:
        engine = owner.submit(Dovetail, tiny_target, random_draft(tiny_target), "cpu").result()
        built_on = owner.submit(lambda: threading.current_thread().name).result()
        app = create_app(engine, INFER, ServerSettings(max_tokens=4), executor=owner)
        with ServerThread(app) as s:
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            for _ in range(2):
                reply = client.chat.completions.create(model="d", messages=MESSAGES, max_tokens=4)
                assert reply.choices[0].finish_reason == "length"
            records = list(app.state.server.scheduler.finished)
            assert [r["thread"] for r in records] == [built_on] * 2
            assert _health(s.url)["status"] == "ok"
        assert not app.state.server.scheduler.alive  # shutdown ended the loop and freed the executor's thread
        assert owner.submit(lambda: 1).result(timeout=10) == 1


def test_time_limit_and_api_key(tiny_target):
    settings = ServerSettings(request_timeout_s=0.4, api_key="sesame", max_tokens=4)
    app = create_app(Dovetail(tiny_target, None, "cpu"), INFER, settings)
    with ServerThread(app) as s:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            assert http.post(CHAT, content=_body()).status_code == 401
            wrong = http.post(CHAT, content=_body(), headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
            assert http.get("/health").status_code == 200  # health and metrics stay open
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0, timeout=60)
        assert client.chat.completions.create(model="d", messages=MESSAGES).usage.completion_tokens == 4
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="d", messages=MESSAGES, max_tokens=1500)
        assert e.value.status_code == 504 and time.monotonic() - t0 < 5
        with pytest.raises(openai.APIError, match="time limit"):  # streaming: an error event after the 200
            list(client.chat.completions.create(model="d", messages=MESSAGES, max_tokens=1500, stream=True))
        records = _records(app.state.server, 3)
        assert [r["outcome"] for r in records] == ["done", "timeout", "timeout"]
        assert all(r["tokens"] < 1500 for r in records)
        _health(s.url)


# ---- fuzz ----------------------------------------------------------------------------------------------------------
_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-3, 6)
    | st.sampled_from([10**6, 2**70, -(2**70)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
_json = st.recursive(
    _leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6
)
_valid = {  # a well-formed value per field
    "model": st.text(max_size=8),
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "developer"]), "content": st.text(min_size=1, max_size=24)}
        ),
        min_size=1,
        max_size=3,
    ).filter(lambda ms: any(m["content"].strip() for m in ms)),
    "prompt": st.text(min_size=1, max_size=24),
    "max_tokens": st.integers(1, 6),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "seed": st.integers(0, 2**32),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.just(1),
}
_base = st.fixed_dictionaries(
    {"messages": _valid["messages"], "prompt": _valid["prompt"]},
    optional={k: v for k, v in _valid.items() if k not in ("messages", "prompt")},
)


@st.composite
def _request(draw) -> tuple[str, bytes, str | None]:
    """(path, body, the field made bad or None): a valid body, one with a junk field, random JSON or bytes."""
    path = draw(st.sampled_from([CHAT, "/v1/completions"]))
    kind = draw(st.sampled_from(["valid", "one junk field", "random", "bytes"]))
    if kind == "bytes":
        return path, draw(st.binary(max_size=40)), None
    if kind == "random":
        return (
            path,
            json.dumps(draw(st.dictionaries(st.sampled_from(sorted(_valid)), _json, max_size=5))).encode(),
            None,
        )
    body = draw(_base)
    bad = None
    if kind == "one junk field":
        bad = draw(st.sampled_from(sorted(_valid)))
        body[bad] = draw(_json)
    return path, json.dumps(body).encode(), bad


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=_request())
def test_fuzzed_request_bodies_never_get_a_500_nor_hang(server, req):
    path, body, bad = req
    with httpx.Client(base_url=server.url, timeout=30) as http:  # a hung worker would time out here
        r = http.post(path, content=body, headers={"content-type": "application/json"})
        event(f"status {r.status_code}")
        assert r.status_code in (200, 400), (body[:200], r.status_code, r.text[:300])
        if r.status_code == 400:
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error"
            if bad is not None:  # the only bad field is the one named
                assert (err["param"] or "").startswith(bad), (bad, err)
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = [line for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and '"error"' not in r.text
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.state.scheduler.alive and server.state.scheduler.current is None


# ---- the real model --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_with_the_shipped_draft_serves_the_targets_greedy_text(smollm2_target):
    engine = Dovetail.from_pretrained(ROOT / "drafts" / "smollm2-135m-dovetail", smollm2_target, "cpu")
    infer = InferConfig(budget=8, depth=6, top_k=4)
    messages = [{"role": "user", "content": "Name three primary colors."}]
    with ServerThread(create_app(engine, infer, ServerSettings(max_tokens=32))) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        whole = client.chat.completions.create(model="d", messages=messages)
        streamed = _streamed(client.chat.completions.create(model="d", messages=messages, stream=True))
    target_only = Dovetail(smollm2_target, None, "cpu").chat(messages, max_tokens=32, infer=infer)
    assert streamed == whole.choices[0].message.content == target_only.text  # float32: token for token
    assert len(target_only.text) > 20
    assert whole.model_extra["dovetail"]["tau"] > 1.2  # the trained draft is accepted


# ---- serve.py --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_py_serves_then_shuts_down_gracefully_on_sigterm(engine, tiny_target, tmp_path):
    import re
    import signal
    import subprocess
    import sys

    from dovetail_infer.checkpoint import save_draft

    draft = save_draft(random_draft(tiny_target, depth=1).float(), tmp_path / "draft", tiny_target.identity())
    cmd = [sys.executable, "serve.py", "target=tiny_random", f"ckpt={draft}", "server.port=0", "max_tokens=8",
           "server.shutdown_timeout_s=1", "infer.budget=6", "infer.depth=4", "infer.top_k=2", "infer.draft_vocab=null",
           f"hydra.run.dir={tmp_path}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        url, lines = None, []
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "".join(lines)[-3000:]
            lines.append(line)
            m = re.search(r"Uvicorn running on (http://\S+)", line)
            url = m and m.group(1)
        assert url, "".join(lines)[-3000:]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["draft"]  # the draft dir's name
        whole = client.chat.completions.create(model="draft", messages=MESSAGES)
        assert whole.choices[0].message.content == engine.chat(MESSAGES, max_tokens=8, infer=INFER).text
        long = client.chat.completions.create(model="draft", messages=MESSAGES, max_tokens=1500, stream=True)
        chunks = iter(long)
        next(chunks), next(chunks)  # decoding when SIGTERM arrives
        proc.send_signal(signal.SIGTERM)
        with pytest.raises((openai.APIError, httpx.HTTPError)):  # cut after the 1 s grace, not run to 1500 tokens
            for _ in chunks:
                pass
        # uvicorn re-raises the SIGTERM it caught once it has shut down: -15 is the orderly exit
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
