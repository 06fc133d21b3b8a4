"""The APIs for other programs (issue 15): the Gradio API's plain /chat, and the OpenAI-compatible
/v1/chat/completions driven by the `openai` client, against the app on 127.0.0.1 over the scripted
fake service (tests/fake_engine.py)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from fake_engine import FakeService
from gradio_client.exceptions import AppError
from served import EMPTY, SETTINGS, client, served, settings_with

from chatapp import cli

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # Gradio's queue statistics

OPENAI = settings_with(openai_api=True)


class Tracked:
    """A turn whose rounds count how many turns run at once (its service keeps the highest count)."""

    def __init__(self, turn, service):
        self._turn, self._service = turn, service

    def __getattr__(self, name):
        return getattr(self._turn, name)

    def __iter__(self):
        service = self._service
        with service.count_lock:
            service.running += 1
            service.most_at_once = max(service.most_at_once, service.running)
        try:
            yield from self._turn
        finally:
            with service.count_lock:
                service.running -= 1


class RecordingService(FakeService):
    """The fake service, also keeping each reply's DecodingSettings and how many replies ran at once."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.decodings, self.count_lock, self.running, self.most_at_once = [], threading.Lock(), 0, 0

    def start_turn(self, history, decoding, system=None, *, fresh=False):
        self.decodings.append(decoding)
        return Tracked(super().start_turn(history, decoding, system, fresh=fresh), self)


@pytest.fixture(scope="module")
def fake():
    return RecordingService()


@pytest.fixture(scope="module")
def app(fake):
    with served(fake, OPENAI) as (demo, url):
        yield demo, url


@pytest.fixture
def gradio(app, fake):
    fake.delay = 0.0
    c = client(app[1])
    yield c
    c.close()


@pytest.fixture
def llm(app, fake):
    fake.delay = 0.0
    return openai.OpenAI(base_url=app[1] + "v1", api_key="none", max_retries=0, timeout=60)


# --- the plain /chat ------------------------------------------------------------------------------


def test_plain_chat_has_named_outputs_and_no_browser_state(app):
    api = app[0].get_api_info()["named_endpoints"]["/chat"]
    assert [p["parameter_name"] for p in api["parameters"]] == ["message", "history", "settings"]
    assert [p["parameter_has_default"] for p in api["parameters"]] == [False, True, True]
    assert [r["label"] for r in api["returns"]] == ["reply", "stats"]


def test_plain_chat_answers_a_message_after_a_history_with_settings(gradio, fake):
    history = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "an answer"}]
    job = gradio.submit(
        "second", history, {"k": 3, "temperature": 0.5, "seed": 11, "decoding.top_k": 40}, api_name="/chat"
    )
    reply, stats = job.result(timeout=30)
    turn = fake.last
    assert fake.histories[-1] == [*history, {"role": "user", "content": "second"}]
    assert (
        fake.decodings[-1].k,
        fake.decodings[-1].temperature,
        fake.decodings[-1].seed,
        fake.decodings[-1].top_k,
    ) == (3, 0.5, 11, 40)
    assert reply == turn.text and "You said: second" in reply
    assert stats == json.loads(json.dumps(turn.record())) and stats["k"] == 3 and stats["mode"] == "speculative"
    partial = [out[0] for out in job.outputs()[:-1]]
    assert len(partial) >= 3 and all(reply.startswith(p) for p in partial), "the reply should stream"
    alone, _ = gradio.predict("just this", api_name="/chat")  # history and settings are optional
    assert fake.histories[-1] == [{"role": "user", "content": "just this"}] and alone == fake.last.text
    assert fake.decodings[-1] == SETTINGS.decoding


@pytest.mark.parametrize(
    "arguments, line",
    [
        (dict(message=7), "the message must be text, not a number"),
        (dict(message="   "), "the message is empty"),
        (dict(message="hi", history="earlier"), "history must be a list of {role, content} messages, not text"),
        (
            dict(message="hi", history=[{"role": "system", "content": "x"}]),
            "history[0].role must be one of user|assistant",
        ),
        (dict(message="hi", history=[{"role": "user", "content": 5}]), "history[0].content must be text, not a number"),
        (dict(message="hi", settings=[1]), "API settings: settings must be an object of decoding fields, not a list"),
        (dict(message="hi", settings={"k": "4"}), 'API settings: decoding.k = "4" must be an integer, not a string'),
        (dict(message="hi", settings={"k": 99}), "API settings: decoding.k = 99 is out of range 1..16"),
        (dict(message="hi", settings={"seed": 2**64}), "decoding.seed = 18446744073709551616 is out of range"),
        (dict(message="hi", settings={"temperature": 1e-40}), "decoding.temperature = 1e-40 is out of range"),
        (dict(message="hi", settings={"colour": "red"}), "unknown key decoding.colour"),
        (dict(message="x" * 100_001), "the message is too large: 100001 characters, at most 100000"),
    ],
)
def test_plain_chat_refuses_a_bad_value_in_one_line_naming_it(gradio, fake, capfd, arguments, line):
    before = len(fake.turns)
    with pytest.raises(AppError) as refused:
        gradio.predict(api_name="/chat", **arguments)
    message = str(refused.value)
    assert line in message and "\n" not in message
    assert len(fake.turns) == before  # nothing ran
    assert "Traceback" not in capfd.readouterr().err


# --- the OpenAI-compatible API ----------------------------------------------------------------------


def test_the_openai_api_is_off_unless_switched_on(fake):
    with served(fake) as (_, url):
        response = httpx.post(url + "v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code in (404, 405) and "chat.completion" not in response.text
    args = cli.build_parser().parse_args(["serve", "--openai-api"])
    assert cli._settings(args).server.openai_api is True
    assert cli._settings(cli.build_parser().parse_args(["serve"])).server.openai_api is SETTINGS.server.openai_api


def test_openai_client_gets_the_reply_and_its_speculative_stats(llm, fake):
    completion = llm.chat.completions.create(
        model="anything",
        max_tokens=12,
        temperature=0.7,
        seed=5,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "uno"},
            {"role": "user", "content": "two"},
        ],
        extra_body={"specchat": {"k": 2, "top_k": 9}},
    )
    turn, decoding = fake.last, fake.decodings[-1]
    assert fake.histories[-1] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "uno"},
        {"role": "user", "content": "two"},
    ]
    assert (
        decoding.system_prompt,
        decoding.max_new_tokens,
        decoding.temperature,
        decoding.seed,
        decoding.k,
        decoding.top_k,
    ) == ("Be brief.", 12, 0.7, 5, 2, 9)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == turn.text
    assert choice.finish_reason == "length" and turn.stats.stop_reason == "max_new_tokens"
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.usage.completion_tokens == turn.stats.new_tokens == 12
    stats = completion.model_extra["specchat"]
    assert stats == json.loads(json.dumps(turn.record()))
    assert stats["k"] == 2 and stats["acceptance_rate"] == pytest.approx(turn.stats.acceptance_rate)
    assert stats["speedup"] == pytest.approx(turn.stats.speedup)


def test_openai_client_streams_the_reply_and_ends_with_its_stats(llm, fake):
    stream = llm.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    turn = fake.last
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 3 and "".join(texts) == turn.text
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop" and turn.stats.stop_reason == "eos"
    assert last.model_extra["specchat"] == json.loads(json.dumps(turn.record()))
    assert last.usage.completion_tokens == turn.stats.new_tokens


@pytest.mark.parametrize(
    "request_fields, line",
    [
        (dict(seed=2**64), "request: decoding.seed = 18446744073709551616 is out of range 0..18446744073709551615"),
        (dict(max_tokens=0), "request: decoding.max_new_tokens = 0 is out of range 1..8192"),
        (dict(extra_body={"k": "4"}), 'decoding.k = "4" must be an integer, not a string'),
        (dict(n=2), "n must be 1"),
        (dict(extra_body={"tools": []}), "unsupported field 'tools'"),
        (dict(messages=[{"role": "assistant", "content": "hi"}]), "messages must end with a user message"),
        (
            dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            "messages[0].content[0] must be a text part",
        ),
        (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role must be one of"),
    ],
)
def test_openai_api_refuses_bad_requests_with_a_400_naming_the_field(llm, fake, capfd, request_fields, line):
    before = len(fake.turns)
    fields = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **request_fields}
    with pytest.raises(openai.BadRequestError) as refused:
        llm.chat.completions.create(**fields)
    assert refused.value.status_code == 400 and line in refused.value.message
    assert len(fake.turns) == before
    assert "Traceback" not in capfd.readouterr().err


def test_the_openai_api_and_the_page_share_one_generation_slot(app, fake):
    fake.delay = 0.01
    fake.most_at_once = 0
    url, results, errors = app[1], [], []

    def page(n: int):
        c = client(url)
        try:
            out = c.submit(message=f"page {n}", chat_state=EMPTY, api_name="/send").result(timeout=120)
            results.append(out[2]["messages"][-1]["content"])
        finally:
            c.close()

    def program(n: int, stream: bool):
        llm = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": f"program {n}"}]
        if stream:
            results.append(
                "".join(
                    c.choices[0].delta.content or ""
                    for c in llm.chat.completions.create(model="m", messages=messages, stream=True)
                    if c.choices
                )
            )
        else:
            results.append(llm.chat.completions.create(model="m", messages=messages).choices[0].message.content)

    def run(job, *args):
        try:
            job(*args)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(page, n)) for n in range(2)]
    threads += [threading.Thread(target=run, args=(program, n, n == 0)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert len(results) == 5 and fake.most_at_once == 1, "replies ran at the same time"
    for who in ("page 0", "page 1", "program 0", "program 1", "program 2"):
        assert sum(f"You said: {who}." in text for text in results) == 1, who


def test_an_openai_client_that_leaves_stops_its_reply(app, fake, llm):
    fake.delay = 0.05  # a standard reply of ~30 rounds: 1.5 s
    before = len(fake.turns)
    stream = llm.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "long one"}],
        stream=True,
        extra_body={"specchat": {"mode": "standard"}},
    )
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    deadline = time.monotonic() + 10
    while len(fake.turns) == before and time.monotonic() < deadline:  # a turn joins the list when it ends
        time.sleep(0.05)
    turn = fake.last
    assert turn.stats.stop_reason == "stopped" and turn.stats.new_tokens < len(turn._ids)
    fake.delay = 0.0
    after = llm.chat.completions.create(model="m", messages=[{"role": "user", "content": "and then"}])
    assert "You said: and then." in after.choices[0].message.content  # the slot was given back


def test_the_openai_api_asks_for_the_credentials_of_an_app_that_has_them(fake):
    with served(fake, OPENAI, auth=[("ann", "s3cret")]) as (_, url):
        stranger = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            stranger.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        ann = openai.OpenAI(base_url=url + "v1", api_key="ann:s3cret", max_retries=0)
        reply = ann.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert "You said: hi." in reply.choices[0].message.content
        assert [m.id for m in ann.models.list()] == ["FakeLM-135M"]
