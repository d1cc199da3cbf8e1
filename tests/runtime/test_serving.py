"""`leapc serve`: the real server on a loopback port, spoken to with OpenAI's own client.
Greedy completions equal the engine's generation (what `leapc run` prints), streamed or
not, under any lossless policy; bad requests get 400s with OpenAI's error object; a full
queue gets 503s and a client that goes away frees its place. Stop strings are checked on
text that arrives in pieces."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

openai = pytest.importorskip("openai", reason="the openai package is not installed "
                                              "(pip install 'leapc[dev]')")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed "
                                                "(pip install 'leapc[serve]')")
import httpx  # noqa: E402

import leapc  # noqa: E402
from leapc.runtime.batching import Scheduler  # noqa: E402
from leapc.runtime.serving.app import ServeConfig  # noqa: E402
from leapc.runtime.serving.background import serving_in_thread  # noqa: E402
from leapc.runtime.serving.stops import StopText  # noqa: E402

PROMPT = "def add(a, b):\n"
MODEL = "pycoder"


def _serving(engine, **config):
    """The app on a free loopback port, in a thread; yields its base URL."""
    return serving_in_thread(engine, ServeConfig(MODEL, **{"policy": "ar", **config}))


@pytest.fixture(scope="module")
def engine(engine_dir):
    return leapc.load(engine_dir("bundled"))


@pytest.fixture(scope="module")
def client(engine):
    with _serving(engine) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.mark.slow  # the bundled engine
def test_greedy_completion_is_the_engines_generation(client, engine):
    expected = engine.generate(PROMPT, 24, token_healing=True)  # the server's default
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens < len(engine.encode(PROMPT))
    assert reply.usage.completion_tokens == 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 24


@pytest.mark.slow
def test_streamed_deltas_join_to_the_same_text(client, engine):
    expected = engine.generate(PROMPT, 24, token_healing=True).text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == 24  # the usage chunk comes last


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["lookup", "suffix", "draft"])
def test_a_requests_policy_returns_ar_s_text(client, engine, policy):
    expected = engine.generate(PROMPT, 32, token_healing=True).text
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32,
                                      temperature=0, extra_body={"leapc": {"policy": policy}})
    assert reply.choices[0].text == expected


@pytest.mark.slow
def test_token_healing_can_be_turned_off_per_request(client, engine):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                      extra_body={"leapc": {"token_healing": False}})
    assert reply.choices[0].text == engine.generate(PROMPT, 16).text
    assert reply.usage.prompt_tokens == len(engine.encode(PROMPT))


@pytest.mark.slow
def test_token_id_prompts_and_stop_strings(client, engine):
    ids = engine.encode(PROMPT)
    full = engine.generate(ids, 32).text
    stop = full[5:8]  # somewhere inside the completion
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=32, temperature=0,
                                      stop=[stop, "\x00never"])
    assert reply.choices[0].text == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=ids, max_tokens=32,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


@pytest.mark.slow
def test_models_and_health(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(str(client.base_url).replace("/v1/", "/health")).json() == {"status": "ok"}


@pytest.mark.slow
@pytest.mark.parametrize("fields, message", [
    ({"temperature": -1}, "temperature"),
    ({"n": 2}, "n"),
    ({"logprobs": 3}, "logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"frequency_penalty": 0.5}}, "frequency_penalty"),
    ({"extra_body": {"beam_width": 4}}, "beam_width"),  # unknown fields are refused too
    ({"extra_body": {"leapc": {"policy": "nonsense"}}}, "unknown policy"),
    ({"extra_body": {"leapc": {"policy": "medusa"}}}, "does not support policy"),
    ({"prompt": [10**6]}, "outside the vocabulary"),
])
def test_bad_requests_get_400_with_openais_error_object(client, fields, message):
    request = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**request)
    body = caught.value.body
    assert body["type"] == "invalid_request_error" and message in body["message"]


@pytest.mark.slow
def test_unknown_model_is_404_and_chat_without_a_template_is_400(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])


def _first_event(lines: Iterator[str]) -> dict:
    """The next event of a stream's ``iter_lines()``. The caller keeps the iterator: one
    dropped mid-stream closes the connection, and the server cancels the generation."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended without an event")


class _HeldEngine:
    """The engine, its scheduler's steps held after the first that emits tokens until
    ``release`` is set, then 50 ms a step: a request stays in the server for as long as
    the test needs."""

    def __init__(self, engine):
        self.engine, self.release = engine, threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def scheduler(self, max_batch: int, step_nodes: int | None = None,
                  prefix_cache_bytes: int = 0) -> Scheduler:
        return _HeldScheduler(self.engine.scheduler(max_batch, step_nodes, prefix_cache_bytes),
                              self.release)


class _HeldScheduler(Scheduler):
    def __init__(self, real: Scheduler, release: threading.Event):
        self.__dict__.update(real.__dict__)
        self.release, self.emitted = release, False

    def step(self):
        if self.emitted:
            self.release.wait(30)
            time.sleep(0.05)
        out = super().step()
        self.emitted = self.emitted or bool(out)
        return out


@pytest.mark.slow
def test_a_full_queue_is_503_and_a_client_gone_frees_its_place(engine):
    held = _HeldEngine(engine)
    with _serving(held, max_queue=1) as url:
        # a prompt the bundled model continues past 200 tokens without an end-of-sequence
        request = {"model": MODEL, "prompt": "import os\n", "max_tokens": 200,
                   "temperature": 0, "stream": True, "leapc": {"policy": "ar"}}
        with httpx.stream("POST", f"{url}/v1/completions", json=request, timeout=60) as first:
            lines = first.iter_lines()
            assert _first_event(lines)["choices"][0]["text"]  # generating, then held
            busy = httpx.post(f"{url}/v1/completions", timeout=60,
                              json={**request, "stream": False, "max_tokens": 2})
            assert busy.status_code == 503
            assert busy.json()["error"]["type"] == "service_unavailable"
        # the first client is gone: let its generation go on, and it stops at its next
        # step, long before its 199 steps of 50 ms
        held.release.set()
        start = time.monotonic()
        while (reply := httpx.post(f"{url}/v1/completions", timeout=60,
                                   json={**request, "stream": False, "max_tokens": 2})
               ).status_code == 503 and time.monotonic() - start < 5:
            time.sleep(0.05)
        assert reply.status_code == 200


@pytest.mark.slow
def test_a_bad_request_is_answered_at_once_not_after_the_queue(engine):
    held = _HeldEngine(engine)
    with _serving(held, max_queue=4) as url:
        request = {"model": MODEL, "prompt": "import os\n", "max_tokens": 50,
                   "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=request, timeout=60) as first:
            lines = first.iter_lines()
            _first_event(lines)  # the worker is busy, held for up to 30 s
            for fields in ({"leapc": {"policy": "nonsense"}}, {"prompt": [10**6]}):
                bad = httpx.post(f"{url}/v1/completions", timeout=5,
                                 json={**request, "stream": False, **fields})
                assert bad.status_code == 400, bad.text
            held.release.set()


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.slow
def test_metrics_count_requests_tokens_and_acceptance(engine):
    with _serving(engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for policy, tokens in (("ar", 16), ("lookup", 48)):
            client.completions.create(model=MODEL, prompt=PROMPT * 3, max_tokens=tokens,
                                      temperature=0, extra_body={"leapc": {"policy": policy}})
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
        lookup = engine.generate(PROMPT * 3, 48, policy="lookup", token_healing=True).stats
        got = _samples(url)
    endpoint = "/v1/completions"
    assert got[("leapc_requests_total", (("endpoint", endpoint), ("status", "200")))] == 2
    assert got[("leapc_requests_total", (("endpoint", endpoint), ("status", "400")))] == 1
    assert got[("leapc_generation_tokens_total", (("policy", "ar"),))] == 16
    assert got[("leapc_decode_steps_total", (("policy", "ar"),))] == 16
    assert got[("leapc_generation_tokens_total", (("policy", "lookup"),))] == 48
    # the mean acceptance length and the drafts are the generation's own
    assert got[("leapc_decode_steps_total", (("policy", "lookup"),))] == lookup.steps
    assert got[("leapc_accepted_draft_tokens_total", (("policy", "lookup"),))] == \
        sum(lookup.accepted_depth)
    assert got[("leapc_prompt_tokens_total", ())] == 2 * lookup.prompt_tokens
    assert got[("leapc_queue_seconds_count", ())] == 2
    assert got[("leapc_time_to_first_token_seconds_count", ())] == 2
    assert got[("leapc_requests_running", ())] == 0 and got[("leapc_requests_waiting", ())] == 0


@pytest.mark.slow
def test_a_repeated_prompt_reuses_its_prefix_and_says_so_in_usage(engine):
    prompt = PROMPT * 8  # several whole blocks of 16 tokens
    expected = engine.generate(prompt, 24, token_healing=True)
    with _serving(engine, prefix_cache_mb=16) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        replies = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                             temperature=0) for _ in range(2)]
        got = _samples(url)
    assert [r.choices[0].text for r in replies] == [expected.text] * 2
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in replies]
    prompt_tokens = expected.stats.prompt_tokens
    assert cached == [0, (prompt_tokens - 1) // 16 * 16] and cached[1] >= 32
    assert got[("leapc_prefix_cache_hits_total", ())] == cached[1]
    assert got[("leapc_prompt_tokens_total", ())] == 2 * prompt_tokens


@pytest.mark.parametrize("chunks, stops, expected, stopped", [
    (["ab", "cd", "ef"], ["cde"], "ab", True),  # spans chunks
    (["abc", "d"], ["cx"], "abcd", False),  # a held prefix that does not complete
    (["xx", "y end", " more"], ["end", "y e"], "xx", True),  # the earliest stop wins
    (["hello"], [], "hello", False),
])
def test_stop_strings_on_text_in_pieces(chunks, stops, expected, stopped):
    text = StopText(tuple(stops))
    out = "".join(text.push(c) for c in chunks) + text.flush()
    assert out == expected and text.stopped is stopped


# ------------------------------------------------------------------ chat

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
            "{{ raise_exception('no tools here') }}{% endif %}{{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}7{% endif %}")


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory):
    """A tiny Llama from a Hugging Face directory whose tokenizer_config.json has a chat
    template (its tokenizer reads whitespace-separated token ids)."""
    from engines import id_tokenizer
    from families import tiny_checkpoint
    from tokenizers.pre_tokenizers import WhitespaceSplit

    directory = tiny_checkpoint("llama", tmp_path_factory.mktemp("chat") / "model")
    tokenizer = id_tokenizer(256)
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    out = tmp_path_factory.mktemp("chat-engine")
    return leapc.load(leapc.build(str(directory), out, "ort", max_seq=128))


@pytest.mark.slow  # builds an engine
def test_chat_renders_the_models_template(chat_engine):
    assert chat_engine.manifest.tokenizer.chat_template == TEMPLATE
    messages = [{"role": "system", "content": "5"}, {"role": "user", "content": "17 200"}]
    expected = chat_engine.generate("5 17 200 7", 12, token_healing=True).text  # the rendering
    with _serving(chat_engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                               temperature=0)
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == expected
        # four tokens, the last backed up by token healing
        assert reply.usage.prompt_tokens == 3 and reply.usage.completion_tokens == 12
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages,
                                                     max_completion_tokens=12, temperature=0,
                                                     stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match="no tools here"):
            client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
                {"role": "tool", "content": "5"}])
