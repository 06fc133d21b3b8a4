"""Hostile input and faults at the UI and its API (issue 11): each defect's test, against the app on
127.0.0.1 over the scripted fake service (tests/fake_engine.py), or over a real ChatService on a tiny
model whose draft or target fails on cue (tests/test_faults.py's Faulty)."""

from __future__ import annotations

import json
import re
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from fake_engine import FakeService
from served import EMPTY, SETTINGS, client, served, settings_with
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from chatapp import ui
from chatapp.autok import AcceptanceTracker
from chatapp.models import load_pair
from chatapp.service import ChatService
from chatapp.settings import SEED_MAX
from chatapp.stats import Baseline
from chatapp.ui.intake import BodyLimit
from chatapp.ui.sidebar import SIDEBAR_FIELDS
from chatapp.ui.stats_tab import stats_summary
from tests.test_faults import Faulty
from tests.test_models import model_settings, tiny, tok  # noqa: F401  (fixtures: tiny model folders)

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # Gradio's queue statistics


def outputs(values) -> dict:
    return dict(zip(ui.CHAT_OUTPUTS, values))


def send(c, message, state=None, **settings) -> dict:
    return outputs(
        c.submit(message=message, chat_state=state or EMPTY, api_name="/send", **settings).result(timeout=60)
    )


def regenerate(c, state, **settings) -> dict:
    return outputs(c.submit(chat_state=state, api_name="/regenerate", **settings).result(timeout=60))


def texts(chatbot) -> list[str]:
    return ["".join(block.get("text", "") for block in m["content"]) for m in chatbot]


def raw_call(url: str, api: str, body: str) -> list:
    """Call a queued endpoint over plain HTTP with a JSON body as written (NaN included); its final data."""
    headers = {"content-type": "application/json"}
    event = httpx.post(f"{url}gradio_api/call/{api}", content=body, headers=headers, timeout=30).json()["event_id"]
    with httpx.stream("GET", f"{url}gradio_api/call/{api}/{event}", timeout=60) as stream:
        lines = list(stream.iter_lines())
    kind = None
    for line in lines:
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: ") and kind in ("complete", "error"):
            return json.loads(line.removeprefix("data: ")) if kind == "complete" else ["ERROR", line]
    raise AssertionError(f"no result: {lines[-5:]}")


@pytest.fixture(scope="module")
def fake():
    return FakeService()


@pytest.fixture(scope="module")
def app(fake):
    with served(fake) as running:
        yield running


@pytest.fixture
def c(app, fake):
    fake.delay = 0.0
    gradio = client(app[1])
    yield gradio
    gradio.close()


# --- defect 1: a long history keeps no one else waiting, and Stop reaches it ---------------------------


class SlowPrompts(FakeService):
    """The fake service with ChatService's split: `prompt()` builds a reply's prompt apart, at a cost
    per message of the history (what a slow tokenizer or the old quadratic build would cost), and
    start_turn builds it itself when not given one."""

    def __init__(self, per_message_s: float, **kwargs):
        super().__init__(**kwargs)
        self.per_message_s, self.builds, self.given = per_message_s, [], []
        self.building = threading.Event()

    def prompt(self, history, decoding, system=None):
        if len(history) > 1:
            self.building.set()
        self.builds.append(len(history))
        time.sleep(self.per_message_s * len(history))
        return SimpleNamespace(ids=list(range(len(history))), dropped_turns=0, notice=None)

    def start_turn(self, history, decoding, system=None, *, fresh=False, prompt=None):
        self.given.append(prompt if prompt is not None else self.prompt(history, decoding, system))
        return super().start_turn(history[-1:], decoding, system, fresh=fresh)


LONG = [
    m
    for i in range(3000)
    for m in ({"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"})
]


def _ask(url: str, api: str, message: str, history: list[dict]) -> list:
    """One request over plain HTTP (gradio_client gives up joining the queue after 5 s; a long
    history's prompt is built while its request joins)."""
    data = [message, history, None] if api == "/chat" else [message, {"messages": history}]
    if api == "/send":
        data += [getattr(SETTINGS.decoding, name) for name in SIDEBAR_FIELDS]  # the sidebar as the page sends it
    return raw_call(url, api.strip("/"), json.dumps({"data": data}))


@pytest.mark.parametrize("api", ["/send", "/chat"])
def test_a_3000_turn_history_keeps_no_one_else_waiting(api):
    # 6,001 messages: 9 s to build. The real tokenizer takes ~0.05 s for this history since the build is
    # linear; the cost stands for a slow tokenizer, or for the quadratic build that held the slot for minutes.
    service = SlowPrompts(per_message_s=0.0015)
    with served(service) as (_, url):
        long_reply: list = []
        worker = threading.Thread(target=lambda: long_reply.append(_ask(url, api, "and now?", LONG)))
        worker.start()
        assert service.building.wait(20), "the long history's prompt should be building"
        started = time.monotonic()
        quick = _ask(url, api, "quick one", [])
        waited = time.monotonic() - started
        assert waited < 3.0, f"a short request waited {waited:.1f} s behind a long history's prompt"
        assert worker.is_alive() and not long_reply
        worker.join(timeout=60)
    assert "You said: quick one" in json.dumps(quick) and "You said: and now?" in json.dumps(long_reply)
    assert service.builds.count(len(LONG) + 1) == 1, "the long prompt was built once, before the slot"
    assert [len(p.ids) for p in service.given] == [1, len(LONG) + 1]  # each reply got its prebuilt prompt


def test_stop_reaches_a_reply_whose_prompt_is_still_being_built():
    service = SlowPrompts(per_message_s=0.0005)  # 3 s
    with served(service) as (_, url):
        c = client(url)
        try:
            job = c.submit(message="and now?", chat_state={"messages": LONG}, api_name="/send")
            assert service.building.wait(20)
            c.predict(api_name="/stop")
            out = outputs(job.result(timeout=60))
            assert "stopped before the reply started" in out["notice"] and not service.given and not service.turns
            assert out["message"] == "and now?" and out["state"] == {"__type__": "update"}  # nothing lost
            again = send(c, "shorter", mode="standard")  # the next one runs
            assert again["state"]["messages"][-1]["content"] == service.last.text
        finally:
            c.close()


def test_a_request_whose_client_left_while_it_queued_never_runs(fake, app):
    fake.delay = 0.03
    busy, leaving = client(app[1]), client(app[1])
    try:
        running = busy.submit(message="long one", chat_state=EMPTY, mode="standard", api_name="/send")
        while len(running.outputs()) < 2:
            time.sleep(0.02)
        queued = leaving.submit(message="never mind", chat_state=EMPTY, api_name="/send")
        deadline = time.monotonic() + 10
        while queued.status().code.name != "IN_QUEUE" and time.monotonic() < deadline:
            time.sleep(0.02)
        queued.cancel()
        running.result(timeout=60)
        time.sleep(0.5)
        assert not any(h[-1]["content"] == "never mind" for h in fake.histories)
    finally:
        busy.close(), leaving.close()


# --- defect 2: a stored chat with malformed records -----------------------------------------------------


MALFORMED = [
    {"mode": "speculative"},  # every other key missing
    {
        "mode": "speculative",
        "k": "four",
        "speedup": "fast",
        "tokens_per_s": [1],
        "acceptance_rate": {"a": 1},
        "mean_accepted_per_round": "x",
        "k_choice": {"k": "x"},
        "source_counts": {"draft": "many"},
    },
    {
        "mode": "standard",
        "new_tokens": None,
        "wall_s": "slow",
        "k_choice": 7,
        "notice": 5,
        "baseline_ratio": "x",
        "baseline_tokens_per_s": True,
    },
    {"mode": "warp"},
    "not a record",
    42,
]


def _saved_chat() -> dict:
    return {
        "messages": [
            m
            for i, stats in enumerate(MALFORMED)
            for m in (
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i}", "stats": stats},
            )
        ]
    }


def _written(state: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in state["messages"]]


def test_a_saved_chat_with_malformed_records_still_works_and_loses_no_text(c, fake, capfd):
    saved = _saved_chat()
    restored = outputs(c.predict(chat_state=saved, api_name="/restore"))
    assert "⚠" not in restored["notice"]
    assert [t for t in texts(restored["chatbot"]) if t.startswith(("question", "answer"))] == [
        m["content"] for m in saved["messages"]
    ]
    assert _written(restored["state"]) == _written(saved)

    out = send(c, "one more", saved)
    assert "⚠" not in out["notice"] and out["state"]["messages"][-1]["content"] == fake.last.text
    assert _written(out["state"])[:-2] == _written(saved)
    kept = [m.get("stats") for m in out["state"]["messages"][1:-2:2]]
    assert kept[0] == {"mode": "speculative"} and kept[1] == {"mode": "speculative", "k_choice": {"k": "x"}}
    assert kept[2] == {"mode": "standard", "new_tokens": None, "k_choice": None} or kept[2]["mode"] == "standard"
    assert kept[3:] == [None, None, None]  # no readable mode: the reply keeps its text, without stats

    again = regenerate(c, out["state"])
    assert "⚠" not in again["notice"] and _written(again["state"])[:-1] == _written(out["state"])[:-1]
    stats = dict(zip(ui.STATS_OUTPUTS, c.predict(chat_state=saved, k=4, api_name="/stats")))
    assert "⚠" not in stats["summary"]
    assert "Traceback" not in capfd.readouterr().err


# --- defect 5: seeds past 2**64 - 1 -----------------------------------------------------------------------


def test_a_seed_past_2_64_is_refused_up_front_in_one_line(c, fake, capfd, app):
    before = len(fake.turns)
    seed_line = f"decoding.seed = {SEED_MAX + 1} is out of range 0..{SEED_MAX}"
    out = send(c, "seeded", seed=SEED_MAX + 1, temperature=0.7)
    assert out["notice"] == f"⚠ Not sent: settings sidebar: {seed_line}" and out["message"] == "seeded"
    again = regenerate(c, {"messages": [{"role": "user", "content": "x"}]}, seed=2**70)
    assert (
        "Cannot regenerate: settings sidebar: decoding.seed = 1180591620717411303424 is out of range" in again["notice"]
    )
    *_, verdict = c.predict(prompt="x", seed=SEED_MAX + 1, api_name="/compare")
    assert seed_line in verdict
    assert len(fake.turns) == before
    assert send(c, "seeded", seed=SEED_MAX, temperature=0.7)["state"]["messages"][-1]["content"] == fake.last.text
    seed_input = next(comp for comp in app[0].config["components"] if comp["props"].get("elem_id") == "seed")
    assert seed_input["props"]["maximum"] == SEED_MAX  # the page refuses it as it is typed too
    assert "Traceback" not in capfd.readouterr().err


# --- defect 6: remote images ---------------------------------------------------------------------------------


IMAGE_MESSAGE = "![pixel](http://tracker.example/p.png) <img src=http://tracker.example/q.png> `![code](x)`"


def test_remote_images_show_as_links_in_user_and_model_text(c, fake):
    out = send(c, IMAGE_MESSAGE)
    user, reply = texts(out["chatbot"])[:2]
    assert reply.startswith("You said: ![pixel]") is False and "You said: [🖼 pixel]" in reply  # the model's text
    for shown in (user, reply):
        assert "![pixel]" not in shown and "<img" not in shown
        assert "[🖼 pixel](http://tracker.example/p.png)" in shown
    assert "&lt;img src=http://tracker.example/q.png>" in user and "`![code](x)`" in user  # code is left as written
    assert out["state"]["messages"][0]["content"] == IMAGE_MESSAGE  # stored as written
    standard, speculative, *_ = c.predict(prompt=IMAGE_MESSAGE, max_new_tokens=8, api_name="/compare")
    assert "![pixel]" not in standard + speculative and "[🖼 pixel]" in standard


def test_remote_images_load_where_the_settings_allow_them():
    service = FakeService()
    with served(service, settings_with(allow_remote_images=True)) as (_, url):
        c = client(url)
        try:
            user, reply = texts(send(c, IMAGE_MESSAGE)["chatbot"])[:2]
        finally:
            c.close()
    assert user == IMAGE_MESSAGE and reply.startswith("You said: ![pixel](http://tracker.example/p.png)")


# --- defect 7: wrong-typed and non-finite values -----------------------------------------------------------


def test_a_nan_k_and_wrong_types_are_one_line_naming_the_field(c, fake, app, capfd):
    url, before = app[1], len(fake.turns)
    stats = httpx.post(
        f"{url}gradio_api/run/stats",
        content='{"data": [{"messages": []}, NaN]}',
        headers={"content-type": "application/json"},
        timeout=30,
    ).json()["data"]
    assert stats[3] == "⚠ Cannot draw the stats: settings sidebar: decoding.k = nan is not a number"
    sent = raw_call(url, "send", '{"data": ["hi", {"messages": []}, "sys", "speculative", NaN, false, 0, 1, 0, 8, 0]}')
    assert outputs(sent)["notice"] == "⚠ Not sent: settings sidebar: decoding.k = nan is not a number"
    cases = [
        (dict(message="hi", k="abc"), "Not sent: settings sidebar: decoding.k = 'abc' is not a number"),
        (dict(message="hi", temperature="hot"), "decoding.temperature = 'hot' is not a number"),
        (dict(message=123), "Not sent: the message must be text, not a number"),
        (dict(message="hi", mode="warp"), 'decoding.mode = "warp" is not one of speculative|standard'),
    ]
    for arguments, line in cases:
        out = outputs(c.submit(chat_state=EMPTY, api_name="/send", **arguments).result(timeout=30))
        assert line in out["notice"] and "\n" not in out["notice"], (arguments, out["notice"])
    junk_state = outputs(c.submit(message="fine", chat_state="not a chat", api_name="/send").result(timeout=30))
    assert junk_state["state"]["messages"][0] == {"role": "user", "content": "fine"}
    summary = dict(zip(ui.STATS_OUTPUTS, c.predict(chat_state=EMPTY, k="x", api_name="/stats")))["summary"]
    assert summary == "⚠ Cannot draw the stats: settings sidebar: decoding.k = 'x' is not a number"
    assert len(fake.turns) == before + 1
    logged = capfd.readouterr()
    assert "Traceback" not in logged.err + logged.out


# --- defect 8: limits on what a client sends ----------------------------------------------------------------


def test_a_message_or_history_past_the_limits_is_too_large(c, fake):
    before = len(fake.turns)
    big = send(c, "x" * 100_001)
    assert big["notice"] == "⚠ Not sent: the message is too large: 100001 characters, at most 100000"
    many = send(c, "hi", {"messages": [{"role": "user", "content": "a"}] * 10_000})
    assert many["notice"] == "⚠ Not sent: the chat history is too large: 10001 messages, at most 10000"
    long = send(c, "hi", {"messages": [{"role": "user", "content": "a" * 100_000}] * 21})
    assert re.fullmatch(
        r"⚠ Not sent: the chat history is too large: 21000\d\d characters with the system prompt, "
        r"at most 2000000",
        long["notice"],
    )
    *_, verdict = c.predict(prompt="x" * 100_001, api_name="/compare")
    assert "the prompt is too large: 100001 characters" in verdict
    assert len(fake.turns) == before


def test_an_upload_or_a_body_past_the_limits_is_refused_as_too_large(app):
    url = app[1]
    upload = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.bin", b"\0" * (2 * 1024 * 1024))}, timeout=30)
    assert upload.status_code == 413 and "exceeded maximum allowed size of 1048576 bytes" in upload.text
    small = httpx.post(f"{url}gradio_api/upload", files={"files": ("small.txt", b"hello")}, timeout=30)
    assert small.status_code == 200
    body = httpx.post(
        f"{url}gradio_api/queue/join",
        content=b"{" + b" " * (17 * 2**20) + b"}",
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert body.status_code == 413 and "too large" in body.json()["error"]


def test_the_body_limit_counts_a_body_sent_without_its_length():
    app = BodyLimit(Starlette(routes=[Route("/", _echo_length, methods=["POST"])]), limit=1000)
    with TestClient(app) as http:
        assert http.post("/", content=b"x" * 1000).text == "1000"
        assert http.post("/", content=b"x" * 1001).status_code == 413
        chunked = http.post("/", content=iter([b"x" * 600, b"x" * 600]))  # no Content-Length: counted
        assert chunked.status_code == 413 and "too large" in chunked.json()["error"]


async def _echo_length(request):
    return PlainTextResponse(str(len(await request.body())))


def test_a_full_queue_tells_the_client_the_server_is_busy():
    service = FakeService(delay=0.2)  # a standard reply of ~40 rounds: 8 s, unless stopped
    with served(service, settings_with(max_queue=2)) as (_, url):
        clients = [client(url) for _ in range(5)]
        try:
            running = clients[0].submit(message="long", chat_state=EMPTY, mode="standard", api_name="/send")
            while len(running.outputs()) < 2:
                time.sleep(0.02)
            jobs = []
            for number, c in enumerate(clients[1:], 1):  # one at a time: each finds the queue as the last left it
                job = c.submit(message=f"m{number}", chat_state=EMPTY, mode="standard", api_name="/send")
                while not job.done() and job.status().code.name != "IN_QUEUE":
                    time.sleep(0.02)
                jobs.append(job)
            # Stop as the page sends it, past the queue (gradio_client would join the full queue for it too).
            stop = httpx.post(f"{url}gradio_api/run/stop", json={"data": [], "session_hash": clients[0].session_hash})
            assert "Stopping" in stop.json()["data"][0]
            running.result(timeout=60)
            results = []
            for job in jobs:
                try:
                    results.append(outputs(job.result(timeout=120))["state"]["messages"][-1]["content"])
                except Exception as error:  # the client's refusal
                    results.append(f"refused: {error}")
        finally:
            for c in clients:
                c.close()
    assert [r.startswith("refused") for r in results] == [False, False, True, True], results
    # Gradio's own check of the queue's length comes first; ours counts requests still arriving too.
    assert all("Queue is full" in r or "the server is busy" in r for r in results[2:]), results
    assert [r.split(".")[0] for r in results[:2]] == ["You said: m1", "You said: m2"]


# --- defect 9: the Stats tab's c -------------------------------------------------------------------------------


def test_the_stats_tab_c_is_the_ratio_of_the_two_medians_it_shows():
    tracker = AcceptanceTracker()
    tracker.record_calibration({1: [0.117] * 20}, [0.115] * 20)  # a slow period, long ago
    tracker.record_calibration({1: [0.020] * tracker.WINDOW}, [0.0051] * tracker.WINDOW)  # this machine now
    text = stats_summary(SimpleNamespace(tracker=tracker, baseline=Baseline()), [])
    c, draft, step = map(
        float, re.search(r"\*\*c = ([\d.]+)\*\*: draft step ([\d.]+) ms ÷ target step ([\d.]+) ms", text).groups()
    )
    assert c == pytest.approx(draft / step, abs=0.0015) == pytest.approx(0.255, abs=0.0015)
    assert f"medians of the last {tracker.WINDOW} draft steps and {tracker.WINDOW} one-token target steps" in text


# --- faults: a draft failing mid-reply, memory running out ------------------------------------------------------


@pytest.fixture(scope="module")
def faulty(tiny):  # noqa: F811
    """A ChatService over a tiny pair whose draft and target fail on cue, served."""
    pair = load_pair(model_settings(target=str(tiny.llama), device="cpu"), lambda message: None)
    pair.target, pair.draft = Faulty(pair.target), Faulty(pair.draft)
    service = ChatService(pair)
    with served(service) as (_, url):
        gradio = client(url)
        yield service, gradio
        gradio.close()


def test_a_draft_failing_mid_reply_says_the_reply_finished_in_standard_mode(faulty):
    service, c = faulty
    service.pair.draft.arm(4, RuntimeError("draft kernel crashed"))
    try:
        out = send(c, "the quick brown fox", k=3, max_new_tokens=16)
    finally:
        service.pair.draft.disarm()
    record = out["state"]["messages"][-1]["stats"]
    assert record["mode"] == "speculative" and record["fallback"].startswith("draft failed: draft kernel crashed")
    assert "speculative**, finished in standard mode (the draft failed)" in out["stats"]
    assert out["notice"].startswith("ℹ") and "finished with standard decoding" in out["notice"]
    aside = next(m for m in out["chatbot"] if m.get("metadata") and "draft failed" in m["metadata"]["title"])
    assert "the target finished it alone (standard decoding)" in texts([aside])[0]
    titles = [(m.get("metadata") or {}).get("title") or "" for m in out["chatbot"]]
    assert any(title.startswith("⚡ speculative → standard") for title in titles), titles


def test_out_of_memory_mid_reply_keeps_the_conversation_and_the_reply_can_be_regenerated(faulty):
    service, c = faulty
    first = send(c, "the quick brown fox", max_new_tokens=8)
    service.pair.target.arm(3, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    try:
        failed = send(c, "jumps over", first["state"], max_new_tokens=8)
    finally:
        service.pair.target.disarm()
    notice = failed["notice"]
    assert notice.startswith("⚠ out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "\n" not in notice
    assert notice.endswith("↻ Regenerate tries this reply again")
    messages = failed["state"]["messages"]
    assert messages[:2] == first["state"]["messages"] and messages[2] == {"role": "user", "content": "jumps over"}
    assert messages[3]["stats"]["stop_reason"] == "out of memory"
    again = regenerate(c, failed["state"], max_new_tokens=8)
    assert again["state"]["messages"][:3] == messages[:3]
    assert again["state"]["messages"][3]["stats"]["stop_reason"] in ("eos", "max_new_tokens")
    assert not again["notice"].startswith("⚠")
