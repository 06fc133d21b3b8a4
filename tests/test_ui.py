"""The Gradio UI, driven through gradio_client against a scripted fake service
(tests/fake_engine.py); one slow test runs the real embedded model."""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import gradio as gr
import pytest
from fake_engine import DRAFT_STEP_S, PREFILL_S, VERIFY_STEP_S, FakeService, FakeTurn, fake_loader
from gradio_client import Client

from chatapp import ui
from chatapp.autok import AcceptanceTracker, KChoice
from chatapp.settings import K_MAX, K_MIN, SettingsError, load_settings
from chatapp.stats import expected_speedup
from chatapp.ui.format import choice_text, stats_line, stats_title
from chatapp.ui.handle import ServiceHandle
from chatapp.ui.handlers import LOAD_OUTPUTS, Handlers
from chatapp.ui.picker import DRAFT_OTHER
from chatapp.ui.sidebar import SIDEBAR_FIELDS, decoding_endpoint
from tests.served import EMPTY, SETTINGS, free_port

# Gradio 6.31's queue statistics use pandas options that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


def launch(service_or_factory):
    demo = ui.build_app(service_or_factory, SETTINGS)
    _, url, _ = ui.launch_app(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
    return demo, Client(url, verbose=False)


@pytest.fixture(scope="module")
def fake():
    return FakeService()


@pytest.fixture(scope="module")
def served(fake):
    demo, client = launch(fake)
    yield demo, client
    client.close()
    demo.close()


@pytest.fixture
def client(served, fake):
    fake.delay = 0.0
    return served[1]


def chat(client, message, state=None, api="/send", **settings):
    args = {"message": message} if api == "/send" else {}
    job = client.submit(chat_state=state or EMPTY, api_name=api, **args, **settings)
    final = dict(zip(ui.CHAT_OUTPUTS, job.result(timeout=30)))
    return final, [dict(zip(ui.CHAT_OUTPUTS, out)) for out in job.outputs()]


def texts(chatbot) -> list[str]:
    return ["".join(block.get("text", "") for block in m["content"]) for m in chatbot]


# --- chat ---------------------------------------------------------------------------


def test_streams_a_reply_with_stats_that_match_the_engine(client, fake):
    out, updates = chat(client, "Hello there")
    turn, s = fake.last, fake.last.stats
    streamed = [u["chatbot"][-1] for u in updates[:-1] if isinstance(u["chatbot"], list) and u["chatbot"]]
    assert len(streamed) >= 3, "the reply should arrive as several partial updates"
    assert len({texts([m])[0] for m in streamed}) >= 3, "the partial updates should grow"

    assert out["message"] == {"__type__": "update"} and updates[0]["message"] == ""  # the box was emptied
    assert out["state"]["messages"][0] == {"role": "user", "content": "Hello there"}
    reply = out["state"]["messages"][1]
    assert reply["content"] == turn.text and reply["stats"]["acceptance_rate"] == pytest.approx(s.acceptance_rate)
    assert turn.text in texts(out["chatbot"])

    line = out["stats"]
    assert "speculative" in line and "K = 4 (fixed)" in line
    assert f"acceptance **{s.acceptance_rate:.1%}**" in line
    assert f"{s.mean_accepted_per_round:.2f} accepted/round" in line
    assert f"{s.tokens_per_s:.1f} tok/s" in line
    # The speedup is priced by standard steps timed inside the reply (the fake times one, as the engine does).
    assert s.speedup == pytest.approx((s.prefill_s + s.new_tokens * s.reference_step_s) / s.wall_s)
    standard_rate = s.new_tokens / s.standard_estimate_s
    assert (
        f"**{s.speedup:.2f}×** vs standard decoding timed within this reply ({standard_rate:.1f} tok/s, "
        "from 1 one-token target step)"
    ) in line
    # Time to first token: the fake's prefill plus its first round, in the line and while streaming.
    assert s.first_token_s == pytest.approx(PREFILL_S + 4 * DRAFT_STEP_S + VERIFY_STEP_S)
    assert f"first token {s.first_token_s:.2f} s" in line
    assert any(f"first token {s.first_token_s:.2f} s" in u["stats"] for u in updates[1:-1]), "the live line has it"
    assert f"reused 0 of {s.prompt_tokens} prompt tokens" in line  # a new conversation: nothing to reuse
    assert s.baseline_source in line and s.int8_path in line
    assert "draft's prompt keys/values copied from the target" in line
    # The same stats sit under the reply in the chat, as a collapsed aside.
    aside = out["chatbot"][-1]
    assert (
        aside["metadata"]["title"].startswith("⚡ speculative · K=4")
        and f"{s.acceptance_rate:.1%}" in aside["metadata"]["title"]
    )

    view = [(t["token"], t["class_or_confidence"]) for t in out["tokens"]]
    assert view == [(fake.tokenizer.decode([t.id]), t.source) for t in turn.tokens]
    assert {"draft", "target", "bonus"} <= {c for _, c in view} <= {"draft", "target", "bonus"}

    table = out["turns_table"]
    assert table["data"][-1][:6] == [1, "speculative", "4", "fixed", s.new_tokens, f"{s.acceptance_rate:.1%}"]
    assert "c = " in out["summary"]


def test_stats_tab_plots_the_conversation(client, fake):
    first, _ = chat(client, "one")
    second, _ = chat(client, "two", first["state"], mode="standard")
    stats = dict(zip(ui.STATS_OUTPUTS, client.predict(chat_state=second["state"], k=4, api_name="/stats")))
    # Native plots: the browser gets the points, not a picture.
    turn_plot, theory_plot = stats["turn_plot"]["value"], stats["theory_plot"]["value"]
    assert (turn_plot["mark"], theory_plot["mark"]) == ("line", "point")
    points = {(row[0], row[2]): row[1] for row in turn_plot["data"]}
    records = [m["stats"] for m in second["state"]["messages"] if m["role"] == "assistant"]
    assert points[(1, "acceptance rate")] == pytest.approx(records[0]["acceptance_rate"])
    assert points[(1, "speedup vs standard decoding (×)")] == pytest.approx(records[0]["speedup"])
    assert points[(2, "speedup vs standard decoding (×)")] == 1.0 and (2, "acceptance rate") not in points
    theory = [row for row in theory_plot["data"] if row[2] == "theory, K=4"]
    c = fake.tracker.cost_ratio
    assert len(theory) == 51 and all(s == pytest.approx(expected_speedup(a, 4, c)) for a, s, _ in theory)
    measured = [row for row in theory_plot["data"] if row[2] == "measured replies, K=4"]
    assert measured == [
        [pytest.approx(records[0]["acceptance_rate"]), pytest.approx(records[0]["speedup"]), "measured replies, K=4"]
    ]
    assert [row[1] for row in stats["turns_table"]["data"]] == ["speculative", "standard"]
    assert f"c = {fake.tracker.cost_ratio:.3f}" in stats["summary"]
    # Then the captions, which name every series drawn (the browser redraws a legend when they change).
    turn_caption, theory = handlers_over(fake).plot_captions(second["state"], 4)
    assert turn_caption["caption"].startswith("Acceptance rate of 1 reply, speedup of 2 (1× = standard")
    assert f"for K = 4 at the measured c = {c:.3f}; measured replies: 1 at K = 4." in theory["caption"]
    assert set(theory["color_map"]) == {"theory, K=4", "measured replies, K=4"}
    empty = dict(zip(ui.STATS_OUTPUTS, client.predict(chat_state=EMPTY, k=4, api_name="/stats")))
    assert empty["turns_table"]["data"] == [] and "0 replies" in empty["summary"]


def test_the_next_turn_reuses_the_conversation_prefix_and_says_how_much(client, fake):
    first, _ = chat(client, "tell me about drafts")
    second, _ = chat(client, "and targets?", first["state"])
    s = fake.last.stats
    assert s.prompt_tokens > s.prefix_reused > 0  # the earlier turn came from the cache, the new message did not
    assert f"reused {s.prefix_reused} of {s.prompt_tokens} prompt tokens" in second["stats"]
    assert second["state"]["messages"][-1]["stats"]["prefix_reused"] == s.prefix_reused


def test_the_stats_tab_says_what_its_figures_come_from(client, fake):
    first, _ = chat(client, "one")
    stats = dict(zip(ui.STATS_OUTPUTS, client.predict(chat_state=first["state"], k=3, api_name="/stats")))
    tracker, samples = fake.tracker, fake.tracker.samples()
    summary = stats["summary"]
    assert f"come from {samples['replies']} replies since the models were loaded" in summary
    assert f"{tracker.accepted} of {tracker.accepted + tracker.rejected} checked drafts" in summary
    assert f"medians of the last {samples['draft_steps']} draft step" in summary
    assert f"{samples['forwards'][1]} one-token target step" in summary
    assert f"**v(3) = {tracker.verify_ratio(3):.2f}** target steps to verify 4 tokens" in summary
    assert f"baseline {fake.baseline.tokens_per_s:.1f} tok/s** (drift only" in summary
    assert "1 reply, 1 speculative" in summary


def test_history_goes_to_the_service_and_the_system_prompt_is_applied(client, fake):
    first, _ = chat(client, "one")
    out, _ = chat(client, "two", first["state"], system_prompt="Be brief.")
    assert [m["content"] for m in fake.histories[-1]] == ["one", fake.turns[-2].text, "two"]
    assert fake.fresh[-1] is False  # a chat reply may reuse the previous reply's keys/values
    assert all(set(m) == {"role", "content"} for m in fake.histories[-1])
    assert [m["role"] for m in out["state"]["messages"]] == ["user", "assistant"] * 2


def test_standard_mode_gives_standard_stats(client, fake):
    out, _ = chat(client, "plain please", mode="standard")
    s = fake.last.stats
    assert s.mode == "standard" and fake.last.tokens
    assert "**standard**" in out["stats"] and "acceptance n/a" in out["stats"] and "draft: not used" in out["stats"]
    assert f"{s.tokens_per_s:.1f} tok/s" in out["stats"]
    # A standard reply is 1× by definition: the line gives its drift against earlier standard runs instead.
    assert f"{s.baseline_ratio:.2f}× the earlier standard runs ({s.baseline_tokens_per_s:.1f} tok/s)" in out["stats"]
    assert "vs standard decoding" not in out["stats"]
    assert {t["class_or_confidence"] for t in out["tokens"]} == {"standard"}
    record = out["state"]["messages"][-1]["stats"]
    assert record["mode"] == "standard" and record["k_choice"] is None and record == fake.last.record()


def test_auto_k_says_how_k_was_chosen(client, fake):
    out, _ = chat(client, "auto", auto_k=True, k=16)
    choice = fake.last.k_choice
    assert isinstance(choice, KChoice) and choice.auto and choice.speculative
    assert choice.k == fake.last.stats.k and fake.last.stats.mode == "speculative"
    assert f"K = {choice.k} (auto: a={choice.acceptance_rate:.2f}, c={choice.cost_ratio:.2f}" in out["stats"]
    assert f"expected {choice.expected_speedup:.2f}×" in out["stats"]
    assert out["state"]["messages"][-1]["stats"]["k_choice"] == choice.to_dict()


def test_auto_k_may_choose_standard_decoding_and_says_so(client, fake, monkeypatch):
    slow_draft = AcceptanceTracker()  # a draft step as slow as the target's: no K can win
    slow_draft.record_calibration({n: [0.02 * (1 + 0.05 * (n - 1))] for n in range(1, K_MAX + 2)}, [0.02] * 8)
    monkeypatch.setattr(fake, "tracker", slow_draft)
    out, _ = chat(client, "auto again", auto_k=True)
    choice = fake.last.k_choice
    assert choice.auto and choice.k == 0 and choice.expected_speedup < 1 and fake.last.stats.mode == "standard"
    assert f"**standard** (auto K: speculation expected to lose, {choice.expected_speedup:.2f}×)" in out["stats"]
    assert "draft: not used" in out["stats"]
    assert out["chatbot"][-1]["metadata"]["title"].startswith("◎ standard (auto K)")
    assert out["turns_table"]["data"][-1][1:4] == ["standard", "—", choice_text(fake.last.record())]


def test_stop_ends_the_reply_within_a_round_and_the_next_one_works(client, fake):
    fake.delay = 0.05  # ~30 rounds in standard mode: 1.5 s
    job = client.submit(message="long one", chat_state=EMPTY, mode="standard", api_name="/send")
    deadline = time.monotonic() + 15
    while len(job.outputs()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "Stopping" in client.predict(api_name="/stop")
    out = dict(zip(ui.CHAT_OUTPUTS, job.result(timeout=15)))
    turn = fake.last
    assert turn.stats.stop_reason == "stopped" and 0 < turn.stats.new_tokens < len(turn._ids)
    assert out["state"]["messages"][-1]["content"] == turn.text and "Stopped" in out["notice"]

    fake.delay = 0.0
    assert client.predict(api_name="/stop") == "Nothing is being generated."
    again, _ = chat(client, "and now?")
    assert fake.last.stats.stop_reason == "eos" and again["state"]["messages"][-1]["content"] == fake.last.text


def test_regenerate_replaces_the_last_reply_and_clear_forgets(client, fake):
    first, _ = chat(client, "tell me", temperature=0.0)
    out, _ = chat(client, None, first["state"], api="/regenerate", temperature=0.8, seed=7)
    assert fake.histories[-1] == [{"role": "user", "content": "tell me"}]
    messages = out["state"]["messages"]
    assert len(messages) == 2 and messages[-1]["content"] == fake.last.text != first["state"]["messages"][-1]["content"]

    cleared = dict(zip(ui.CHAT_OUTPUTS, client.predict(api_name="/clear")))
    assert cleared["state"] == EMPTY and cleared["chatbot"] == [] and cleared["tokens"] == []
    nothing, _ = chat(client, None, EMPTY, api="/regenerate")
    assert "nothing to regenerate" in nothing["notice"]


def test_restore_rebuilds_the_chat_from_browser_state(client):
    first, _ = chat(client, "remember me")
    restored = dict(zip(ui.CHAT_OUTPUTS, client.predict(chat_state=first["state"], api_name="/restore")))
    assert texts(restored["chatbot"])[:2] == ["remember me", first["state"]["messages"][1]["content"]]
    assert restored["stats"] == first["stats"]
    junk = dict(zip(ui.CHAT_OUTPUTS, client.predict(chat_state={"messages": [{"role": "x"}, 3]}, api_name="/restore")))
    assert junk["chatbot"] == [] and junk["state"] == EMPTY


def test_restore_reads_records_saved_by_the_previous_version(client):
    """The previous version stored its own record: k_choice a string ("fixed", "auto (...)", "" for a
    standard reply), k None for standard replies, a speedup over the load-time baseline and no
    standard_estimate_s or baseline_ratio. A browser may still hold such a chat."""
    common = dict(
        new_tokens=40,
        rounds=12,
        drafted=48,
        source_counts={"draft": 30},
        baseline_tokens_per_s=30.0,
        baseline_source="median of 1 standard-decoding run(s)",
        draft_prefill="",
        stop_reason="eos",
        wall_s=0.9,
        prefill_s=0.01,
        notice=None,
    )
    spec = dict(
        common,
        mode="speculative",
        k=6,
        k_choice="auto (a=0.91, c=0.30)",
        accepted=30,
        acceptance_rate=0.91,
        mean_accepted_per_round=2.5,
        tokens_per_s=45.0,
        speedup=1.5,
        int8_path="int8 (old)",
    )
    std = dict(
        common,
        mode="standard",
        k=None,
        k_choice="",
        accepted=0,
        acceptance_rate=None,
        mean_accepted_per_round=None,
        tokens_per_s=29.4,
        speedup=0.98,
        int8_path="",
    )
    old = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "stats": spec},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d", "stats": std},
        ]
    }
    restored = dict(zip(ui.CHAT_OUTPUTS, client.predict(chat_state=old, api_name="/restore")))
    assert texts(restored["chatbot"])[:2] == ["a", "b"] and "⚠" not in restored["notice"]
    spec_line = texts(restored["chatbot"])[2]
    assert "K = 6 (auto (a=0.91, c=0.30))" in spec_line  # the old words, shown as they are
    assert "**1.50×** vs standard decoding (30.0 tok/s)" in spec_line
    assert "**standard** (target only)" in restored["stats"] and "**0.98×** vs standard decoding" in restored["stats"]
    assert [row[1:4] for row in restored["turns_table"]["data"]] == [
        ["speculative", "6", "auto (a=0.91, c=0.30)"],
        ["standard", "—", "—"],
    ]


def handlers_over(fake):
    return Handlers(ServiceHandle(fake), SETTINGS)


# --- the chat's own controls: undo, edit, examples, retry ------------------------------


def test_undo_takes_the_last_exchange_back_into_the_input_box(client, fake):
    first, _ = chat(client, "one")
    second, _ = chat(client, "two", first["state"])
    undone = dict(zip(ui.CHAT_OUTPUTS, client.predict(second["state"], api_name="/undo")))  # the Chatbot's Undo
    assert undone["message"] == "two" and undone["state"] == first["state"]
    assert texts(undone["chatbot"]) == texts(first["chatbot"]) and undone["stats"] == first["stats"]
    empty = dict(zip(ui.CHAT_OUTPUTS, client.predict(EMPTY, api_name="/undo")))
    assert empty["notice"] == "Nothing to undo." and empty["state"] == {"__type__": "update"}


def test_an_edited_message_drops_what_followed_and_is_sent_again(client, fake):
    first, _ = chat(client, "one")
    second, _ = chat(client, "two", first["state"])
    shown = second["chatbot"]  # the Chatbot counts the stats asides too
    index = max(i for i, m in enumerate(shown) if m["role"] == "user")
    h = handlers_over(fake)
    edit = gr.EditData(None, {"index": index, "value": "two, edited", "previous_value": "two"})
    out = h.edit(second["state"], shown, 5, edit)
    view, resend = dict(zip(ui.CHAT_OUTPUTS, out[:-1])), out[-1]
    assert view["state"] == first["state"] and view["message"] == "two, edited" and resend == 6  # 6: sends it
    # The first message edited: nothing before it stays.
    zero = gr.EditData(None, {"index": 0, "value": [{"text": "zero"}], "previous_value": "one"})
    out = h.edit(second["state"], shown, 0, zero)
    assert out[:-1][ui.CHAT_OUTPUTS.index("state")] == EMPTY and out[-1] == 1
    assert out[:-1][ui.CHAT_OUTPUTS.index("message")] == "zero"
    with pytest.raises(gr.Error, match="empty"):  # nothing is dropped for an empty edit
        h.edit(second["state"], shown, 0, gr.EditData(None, {"index": index, "value": "  ", "previous_value": "two"}))
    with pytest.raises(gr.Error, match="no longer in the chat"):
        h.edit(first["state"], shown, 0, gr.EditData(None, {"index": index, "value": "late", "previous_value": "two"}))


def test_an_example_prompt_goes_to_the_box_and_is_sent(fake):
    selection = gr.SelectData(None, {"index": 1, "value": {"text": "Write a haiku."}})
    assert handlers_over(fake).example(2, selection) == ("Write a haiku.", 3)


def test_retry_and_the_chatbot_controls_are_wired(served):
    demo = served[0]
    by_trigger = {}
    for fn in demo.fns.values():
        for block_id, event in fn.targets:
            by_trigger.setdefault(event, set()).add(getattr(fn.fn, "__name__", None))
    assert "regenerate" in by_trigger["retry"] and "undo" in by_trigger["undo"] and "edit" in by_trigger["edit"]
    assert "example" in by_trigger["example_select"] and "clear" in by_trigger["clear"]


# --- bad input ------------------------------------------------------------------------


def test_empty_message_is_a_one_line_error(client, fake):
    before = len(fake.turns)
    out, _ = chat(client, "   ")
    assert "empty" in out["notice"] and "\n" not in out["notice"]
    assert out["state"] == {"__type__": "update"} and len(fake.turns) == before
    ok, _ = chat(client, "fine")
    assert ok["state"]["messages"][-1]["content"] == fake.last.text


def test_too_long_message_keeps_the_text_and_the_app(client, fake):
    text = "word " * 600  # over the fake's 2000-character limit
    out, _ = chat(client, text)
    assert "Not sent" in out["notice"] and "too long" in out["notice"] and "\n" not in out["notice"]
    assert out["message"] == text  # the user's text stays in the box
    assert out["state"] == {"__type__": "update"}
    ok, _ = chat(client, "shorter")
    assert ok["state"]["messages"][-1]["content"] == fake.last.text


def test_old_turns_dropped_with_a_visible_notice(client):
    long = "blah " * 300
    state = {
        "messages": [
            m for i in range(3) for m in ({"role": "user", "content": long}, {"role": "assistant", "content": long})
        ]
    }
    out, _ = chat(client, "latest", state)
    assert "dropped to fit the context" in out["notice"]
    titles = [m["metadata"]["title"] for m in out["chatbot"] if m.get("metadata")]
    assert any("earlier turn(s) dropped" in t for t in titles)
    assert out["state"]["messages"][-1]["stats"]["notice"].endswith("dropped to fit the context")


def test_bad_settings_are_one_line_errors():
    with pytest.raises(SettingsError, match=r"decoding\.top_p = 0\.0 is out of range"):
        ui.decoding_settings(SETTINGS, dict(mode="speculative", k=4, top_p=0.0))
    with pytest.raises(SettingsError, match=r"settings sidebar: decoding\.seed = 'x' is not a number"):
        ui.decoding_settings(SETTINGS, dict(seed="x"))
    values = dict(
        mode="standard",
        k=7.0,
        auto_k=True,
        temperature=0.5,
        top_p=0.9,
        top_k=40.0,
        max_new_tokens=12.0,
        seed=3.0,
        system_prompt="sys",
    )
    d = ui.decoding_settings(SETTINGS, values)
    assert (d.mode, d.k, d.auto_k, d.temperature, d.top_p, d.top_k, d.max_new_tokens, d.seed, d.system_prompt) == (
        "standard",
        7,
        True,
        0.5,
        0.9,
        40,
        12,
        3,
        "sys",
    )
    assert type(d.k) is int and type(d.seed) is int
    assert ui.decoding_settings(SETTINGS, dict(seed=2**64 - 1)).seed == 2**64 - 1  # exact: no float on the way
    assert ui.decoding_settings(SETTINGS, dict(k=None, temperature="")) == SETTINGS.decoding  # not given: defaults


def test_the_endpoint_builds_one_decoding_settings_and_keeps_the_api_names():
    calls = []

    def handler(message, decoding, request):
        calls.append((message, decoding, request))
        yield "ran"

    endpoint = decoding_endpoint(handler, lambda error, message: f"refused {message}: {error}", SETTINGS, ["message"])
    assert list(inspect.signature(endpoint).parameters) == ["message", *SIDEBAR_FIELDS, "request"]
    values = {**asdict(SETTINGS.decoding), "k": 6.0, "seed": 9}
    assert list(endpoint("hi", *(values[name] for name in SIDEBAR_FIELDS), "req")) == ["ran"]
    assert calls == [("hi", replace(SETTINGS.decoding, k=6, seed=9), "req")]
    # Gradio checks slider ranges itself; a value it lets through that the settings refuse is one line, not a crash.
    values["top_p"] = 0.0
    (refused,) = endpoint("hi", *(values[name] for name in SIDEBAR_FIELDS), None)
    assert refused.startswith("refused hi: settings sidebar: decoding.top_p = 0.0 is out of range") and len(calls) == 1


def test_api_endpoints_keep_their_names_and_parameters(served):
    api = served[0].get_api_info()["named_endpoints"]
    sidebar = ["system_prompt", "mode", "k", "auto_k", "temperature", "top_p", "top_k", "max_new_tokens", "seed"]
    expected = {
        "/chat": ["message", "history", "settings"],  # for other programs: no browser state (tests/test_api.py)
        "/send": ["message", "chat_state", *sidebar],
        "/regenerate": ["chat_state", *sidebar],
        "/compare": ["prompt", *(name for name in sidebar if name != "mode")],
        "/stats": ["chat_state", "k"],
        "/restore": ["chat_state"],
        "/clear": [],
        "/stop": [],
        "/model_info": [],
    }
    assert {name: [p["parameter_name"] for p in e["parameters"]] for name, e in api.items()} == expected
    assert [len(api[name]["returns"]) for name in ("/send", "/stats", "/compare", "/chat")] == [8, 4, 4, 2]
    k = next(p for p in api["/send"]["parameters"] if p["parameter_name"] == "k")
    assert k["type"]["description"] == f"numeric value between {K_MIN} and {K_MAX}"


def test_stats_line_is_one_function_for_the_ui_and_the_terminal():
    turn = FakeService().start_turn([{"role": "user", "content": "hi"}], SETTINGS.decoding)
    list(turn)
    record, s = turn.record(), turn.stats
    markdown, plain = stats_line(record), stats_line(record, markdown=False)
    assert "**" in markdown and "⚡" in markdown and "*" not in plain and "⚡" not in plain
    assert plain.splitlines()[0] == markdown.split("\n\n")[0].replace("**", "").removeprefix("⚡ ")
    for part in (
        f"K = {s.k} (fixed)",
        f"acceptance {s.acceptance_rate:.1%}",
        f"{s.tokens_per_s:.1f} tok/s",
        f"{s.speedup:.2f}× vs standard decoding",
        f"{s.new_tokens} tokens in {s.wall_s:.2f} s",
        "stop: eos",
    ):
        assert part in plain, (part, plain)
    assert stats_title(record).startswith(f"⚡ speculative · K={s.k} fixed")


def test_the_stats_line_module_does_not_import_gradio():
    code = "import sys, chatapp.ui.format; assert 'gradio' not in sys.modules, 'gradio imported'"
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# --- compare, model, serving ---------------------------------------------------------------


def test_compare_runs_both_fairly_and_alternates_the_order(client, fake):
    job = client.submit(prompt="Compare me", max_new_tokens=64, api_name="/compare")
    std, spec, table, verdict = job.result(timeout=30)
    a, b = fake.turns[-2:]
    assert {a.stats.mode, b.stats.mode} == {"standard", "speculative"}
    assert fake.histories[-1] == fake.histories[-2] == [{"role": "user", "content": "Compare me"}]
    assert fake.fresh[-2:] == [True, True]  # both runs pay the whole prefill: no cache kept from the chat
    assert std == spec == a.text == b.text and std
    assert "Identical" in verdict and "standard first" in verdict
    rows = {r[0]: r for r in table["data"]}
    assert table["headers"] == ["decoding", "ran", "tokens", "wall time (s)", "tokens/s", "acceptance rate", "speedup"]
    std_s, spec_s = (a.stats, b.stats) if a.stats.mode == "standard" else (b.stats, a.stats)
    assert rows["standard"][1:3] == ["1st", std_s.new_tokens] and rows["speculative"][1] == "2nd"
    assert rows["speculative"][5] == f"{spec_s.acceptance_rate:.1%}"
    assert rows["speculative"][6] == f"{spec_s.tokens_per_s / std_s.tokens_per_s:.2f}×"
    partial = [dict(zip(ui.COMPARE_OUTPUTS, o)) for o in job.outputs()[:-1]]
    assert any(isinstance(p["standard"], str) and p["standard"].endswith(ui.CURSOR) for p in partial)
    assert any(isinstance(p["speculative"], str) and p["speculative"].endswith(ui.CURSOR) for p in partial)

    _, _, table2, verdict2 = client.predict(prompt="Compare me", max_new_tokens=64, api_name="/compare")
    assert "speculative first" in verdict2 and {r[0]: r[1] for r in table2["data"]}["speculative"] == "1st"


def test_model_info(client):
    text = client.predict(api_name="/model_info")
    for expected in (
        "FakeLM-135M",
        "int8 weight-only per-channel (fake)",
        "538.1 MB",
        "162.0 MB",
        "134.5 M",
        "float32",
        "fake (scripted)",
        "compatible: the draft is a quantized copy",
        "Load time:** 0.2 s",
    ):
        assert expected in text


def test_generation_shares_one_queue_slot(served):
    demo = served[0]
    gen = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name in ("chat", "regenerate", "compare")}
    assert set(gen) == {"chat", "regenerate", "compare"}
    assert {(fn.concurrency_id, fn.concurrency_limit, fn.queue) for fn in gen.values()} == {(ui.GENERATION, 1, True)}
    assert demo.server_name == "127.0.0.1"


# --- the Model tab's picker ----------------------------------------------------------------

PICK_OTHER = ("(custom)", "tiny/target", "another model (same tokenizer)", "tiny/draft", "none")  # PICKER_INPUTS' order


def launch_with_loader(service, loader, settings=SETTINGS):
    demo = ui.build_app(service, settings, loader=loader)
    _, url, _ = ui.launch_app(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
    return demo, Client(url, verbose=False)


def load(client, *picker, timeout=60):
    """Press Load with the picker's values; the final outputs by name, and the streamed load statuses."""
    job = client.submit(*picker, api_name="/load_model")
    final = dict(zip(LOAD_OUTPUTS, job.result(timeout=timeout)))
    return final, [dict(zip(LOAD_OUTPUTS, out))["load_status"] for out in job.outputs()]


def test_the_model_tab_swaps_the_pair_once_loaded_and_serves_meanwhile():
    first = FakeService()
    demo, client = launch_with_loader(first, functools.partial(fake_loader, step_s=0.6))
    try:
        job = client.submit(*PICK_OTHER, api_name="/load_model")
        time.sleep(0.3)
        during, _ = chat(client, "still there?")  # the current pair answers while the new one loads
        assert first.turns and during["state"]["messages"][-1]["content"] == first.last.text
        final = dict(zip(LOAD_OUTPUTS, job.result(timeout=60)))
        statuses = [dict(zip(LOAD_OUTPUTS, out))["load_status"] for out in job.outputs()]
        assert any("Loading the new pair" in s and "loading tiny/target (fake)" in s for s in statuses)
        status = final["load_status"]
        assert status.startswith("✔ **Now serving:** Target **tiny/target**") and "Draft **tiny/draft**" in status
        # The vocabulary check is shown, and before the swap.
        assert status.index("vocabulary check: compatible: tiny/draft speaks") < len(status)
        assert "tiny/target" in final["model"] and "tiny/draft" in final["model"]
        assert final["status"].startswith("Target **tiny/target**")
        new = demo.specchat_handle.service
        assert new is not first and new.pair.target.info.name == "tiny/target"
        after, _ = chat(client, "and now?")  # the next reply is the new pair's
        assert new.turns and after["state"]["messages"][-1]["content"] == new.last.text and len(first.turns) == 1
        assert "tiny/target" in client.predict(api_name="/model_info")
        picked = demo.specchat_handle.loaded_from
        assert (picked.target, picked.draft, picked.draft_quantization) == ("tiny/target", "tiny/draft", "none")
    finally:
        client.close()
        demo.close()


def test_prompts_prepared_for_the_old_pair_are_not_used_after_a_swap():
    """A request's prompt is built (as token ids) when it joins the queue; one built before a swap must be built
    again for the new pair's tokenizer."""
    from chatapp.ui.intake import Prepared, PromptDesk

    desk = PromptDesk()
    before = Prepared("a", 0, prompt="old ids")
    desk.put("k", before)
    late = Prepared("b", 0, prompt="old ids too")  # made before the swap, put after it
    desk.forget(time.monotonic())
    desk.put("k2", late)
    assert desk.take("k", "a", 0) is None and desk.take("k2", "b", 0) is None and len(desk) == 0
    after = Prepared("c", 0, prompt="new ids")
    desk.put("k", after)
    assert desk.take("k", "c", 0) is after

    # The Model tab's Load has the handlers' desk forget what was prepared before its swap.
    h = Handlers(ServiceHandle(FakeService()), SETTINGS, functools.partial(fake_loader, step_s=0))
    h.prepare_chat("a message", EMPTY, SETTINGS.decoding)
    assert len(h.desk) == 1
    *_, final = h.load_model(*PICK_OTHER)
    assert final[0].startswith("✔") and len(h.desk) == 0


def test_a_failed_load_keeps_the_pair_serving_and_says_why_in_one_line():
    first = FakeService()
    demo, client = launch_with_loader(first, fake_loader)
    try:
        final, _ = load(client, "(custom)", "tiny/target", DRAFT_OTHER, "tiny/incompatible", "auto")
        status = final["load_status"]
        assert status.startswith("✘ **Not loaded:** 'tiny/incompatible' does not speak 'tiny/target''s vocabulary")
        assert "Still serving: Target **FakeLM-135M**" in status and "\n" not in status.split("\n\n")[0]
        assert demo.specchat_handle.service is first and demo.specchat_handle.loaded_from is None
        ok, _ = chat(client, "fine?")
        assert ok["state"]["messages"][-1]["content"] == first.last.text
        final, _ = load(client, "(custom)", "org/missing", "the target's INT8 copy", "", "auto")
        assert "not found on the Hugging Face hub" in final["load_status"] and demo.specchat_handle.service is first
        # Values the settings refuse are one line too, and nothing is loaded.
        final, _ = load(client, "(custom)", "  ", "the target's INT8 copy", "", "auto")
        assert final["load_status"] == '⚠ Not loaded: Model tab: model.target = "" must not be empty'
        final, _ = load(client, "(custom)", "tiny/target", "another model (same tokenizer)", "", "auto")
        assert "name the draft model" in final["load_status"]
        assert demo.specchat_handle.reloading.label.target == "org/missing"  # the refused ones started nothing
    finally:
        client.close()
        demo.close()


def test_a_second_load_waits_for_the_first_and_a_failed_start_can_be_mended():
    release = threading.Event()

    def slow_loader(settings, progress):
        release.wait(10)
        return fake_loader(settings, progress, step_s=0)

    def broken(progress):
        raise RuntimeError("no such model")

    demo, client = launch_with_loader(broken, slow_loader)
    try:
        assert demo.specchat_handle.wait(10) == "error"
        job = client.submit(*PICK_OTHER, api_name="/load_model")
        time.sleep(0.5)
        again, _ = load(client, *PICK_OTHER)
        assert again["load_status"] == "⚠ Models are being loaded already: wait for that to end."
        release.set()
        final = dict(zip(LOAD_OUTPUTS, job.result(timeout=30)))
        assert final["load_status"].startswith("✔ **Now serving:**") and demo.specchat_handle.status == "ready"
        ok, _ = chat(client, "works now")  # the app that could not load its models at start serves now
        assert ok["state"]["messages"][-1]["content"] == demo.specchat_handle.service.last.text
    finally:
        release.set()
        client.close()
        demo.close()


def test_presets_fill_the_picker_and_a_shared_server_does_not_switch(fake):
    h = handlers_over(fake)
    preset = SETTINGS.presets["qwen2.5-7b"]
    assert h.choose_preset("qwen2.5-7b") == (preset["target"], DRAFT_OTHER, preset["draft"], "auto")
    assert h.choose_preset("(custom)") == (gr.skip(),) * 4  # the custom entry leaves the picker as it is
    shared = replace(SETTINGS, server=replace(SETTINGS.server, host="0.0.0.0"))
    for settings in (shared, replace(SETTINGS, server=replace(SETTINGS.server, share=True))):
        handle = ServiceHandle(fake)
        with pytest.warns(UserWarning, match="Switching models from the page is off"):  # the toast, off Gradio
            refused = list(Handlers(handle, settings, fake_loader).load_model(*PICK_OTHER))
        assert len(refused) == 1 and "Switching models from the page is off" in refused[0][0]
        assert handle.reloading is None and handle.service is fake


def test_the_model_tab_loads_local_model_folders(tmp_path):
    """The app's own loader on tiny Llama folders with a tokenizer: a pair of two folders swaps in and chats;
    a draft with another vocabulary is refused by the vocabulary check, and the pair keeps serving."""
    from test_models import OTHER_CORPUS, save_folder, tiny_llama, tiny_tokenizer

    tok, other = tiny_tokenizer(), tiny_tokenizer(OTHER_CORPUS)
    target = save_folder(tmp_path / "tiny-target", tiny_llama(len(tok)), tok)
    draft = save_folder(tmp_path / "tiny-draft", tiny_llama(len(tok), seed=1), tok)
    stranger = save_folder(tmp_path / "other-vocab", tiny_llama(len(other)), other)
    settings = replace(
        SETTINGS,
        model=replace(SETTINGS.model, device="cpu", max_context=256),
        decoding=replace(SETTINGS.decoding, max_new_tokens=12),
    )
    first = FakeService()
    demo, client = launch_with_loader(first, None, settings)  # None: the app's own loader
    try:
        # The first load of the CPU kernels builds them (minutes on a busy 2-core machine).
        final, _ = load(
            client, "(custom)", str(target), "another model (same tokenizer)", str(draft), "auto", timeout=900
        )
        assert final["load_status"].startswith("✔ **Now serving:** Target **tiny-target**"), final["load_status"]
        assert "vocabulary check: compatible" in final["load_status"]
        service = demo.specchat_handle.service
        assert service is not first and service.pair.draft.info.name == "tiny-draft"
        out, _ = chat(client, "Hello world", max_new_tokens=12)
        record = out["state"]["messages"][-1]["stats"]
        assert record["mode"] == "speculative" and record["new_tokens"] > 0 and "int8" in record["int8_path"].lower()

        refused, _ = load(client, "(custom)", str(target), "another model (same tokenizer)", str(stranger), "auto")
        assert refused["load_status"].startswith("✘ **Not loaded:**") and "vocabulary" in refused["load_status"]
        assert demo.specchat_handle.service is service  # still serving the tiny pair
        again, _ = chat(client, "Hello again", out["state"], max_new_tokens=12)
        assert again["state"]["messages"][-1]["stats"]["new_tokens"] > 0
    finally:
        client.close()
        demo.close()


def test_loading_progress_and_load_errors_show_in_the_ui():
    from chatapp.models import ModelLoadError

    release = threading.Event()

    def factory(progress):
        progress("fetching the weights")
        release.wait(10)
        raise ModelLoadError("model 'nope/missing' was not found on the Hugging Face hub")

    demo, client = launch(factory)
    try:
        assert "fetching the weights" in client.predict(api_name="/model_info")
        out, _ = chat(client, "hi")
        assert "still loading" in out["notice"] and out["message"] == "hi"
        release.set()
        assert demo.specchat_handle.wait(10) == "error"
        text = client.predict(api_name="/model_info")
        assert "could not be loaded" in text and "nope/missing" in text and "Traceback" not in text
        out, _ = chat(client, "hi")
        assert "failed to load: model 'nope/missing' was not found" in out["notice"]
        _, _, _, verdict = client.predict(prompt="x", api_name="/compare")
        assert "failed to load" in verdict
    finally:
        release.set()
        client.close()
        demo.close()


def test_engine_failure_mid_reply_is_one_line(client, fake, monkeypatch):
    def broken(self, i):
        if i == 2:
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
        return original(self, i)

    original = FakeTurn._round
    monkeypatch.setattr(FakeTurn, "_round", broken)
    out, _ = chat(client, "break please")
    assert "generation failed: CUDA out of memory. Tried to allocate 2 GiB" in out["notice"]
    assert out["state"]["messages"][-1]["content"] == fake.last.text  # what came before the failure is kept


# --- the token view ------------------------------------------------------------------------

EMOJI_TEXT = "I feel 🙂 today, café 日本"


def byte_level_tokenizer():
    """A tiny byte-level BPE that never saw an emoji or a kanji: they become several byte tokens each."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_end|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["You said: hello there. Speculative decoding is fast."] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")  # id 0: the end of turn


def split_tokens(tokenizer, text):
    from chatapp.engine import Token

    ids = tokenizer.encode(text, add_special_tokens=False)
    return [Token(i, ("draft", "target", "bonus")[n % 3]) for n, i in enumerate(ids)]


@pytest.mark.parametrize("tokenizer_name", ["byte-level BPE", pytest.param("SmolLM2", marks=pytest.mark.slow)])
def test_the_token_view_shows_a_character_split_over_tokens_once(tokenizer_name):
    from chatapp.ui.tokens import TokenView

    if tokenizer_name == "SmolLM2":
        from chatapp.models import ensure_embedded_model, load_tokenizer

        tokenizer = load_tokenizer(ensure_embedded_model())
    else:
        tokenizer = byte_level_tokenizer()
    tokens = split_tokens(tokenizer, EMOJI_TEXT)
    alone = [tokenizer.decode([t.id]) for t in tokens]
    assert any("\ufffd" in piece for piece in alone), "the test needs a character split over tokens"

    view = TokenView()(tokenizer, tokens)
    assert "".join(piece for piece, _ in view) == EMOJI_TEXT and not any("\ufffd" in p for p, _ in view)
    # Each group is shown once, colored by the source of its last token (the one that completed it).
    consumed = 0
    for piece, source in view:
        group = next(
            n
            for n in range(1, len(tokens) - consumed + 1)
            if tokenizer.decode([t.id for t in tokens[consumed : consumed + n]]) == piece
        )
        assert source == tokens[consumed + group - 1].source
        assert group == 1 or "\ufffd" in alone[consumed]  # only split characters are grouped
        consumed += group
    assert consumed == len(tokens)

    # Streamed one token at a time (a character split across rounds), the pieces are the same.
    stream = TokenView().stream(tokenizer)
    streamed = [pair for t in tokens for pair in stream.push([t])] + stream.flush()
    assert streamed == view
    # A reply cut inside a character shows what it has, as it decodes.
    cut = next(i for i, piece in enumerate(alone) if piece.endswith("\ufffd")) + 1
    stream = TokenView().stream(tokenizer)
    held = stream.push(tokens[:cut])
    assert "".join(p for p, _ in held + stream.flush()) == tokenizer.decode([t.id for t in tokens[:cut]])


def test_the_chat_token_view_never_shows_half_a_character():
    fake = FakeService(tokenizer=byte_level_tokenizer())
    demo, client = launch(fake)
    try:
        out, updates = chat(client, "I feel 🙂 today")
        turn = fake.last
        assert "🙂" in turn.text and "\ufffd" not in turn.text
        pieces = [t["token"] for t in out["tokens"]]
        assert "".join(pieces) == fake.tokenizer.decode([t.id for t in turn.tokens])
        assert any("🙂" in piece for piece in pieces) and len(pieces) < len(turn.tokens)
        for update in updates:
            if isinstance(update["tokens"], list):
                assert not any("\ufffd" in t["token"] for t in update["tokens"]), update["tokens"]
    finally:
        client.close()
        demo.close()


# --- the real model ----------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_speculative_equals_standard_at_t0():
    from chatapp.models import load_pair
    from chatapp.service import ChatService

    service = ChatService(load_pair(load_settings().model, progress=lambda message: None))
    demo, client = launch(service)
    try:
        greedy = dict(temperature=0.0, max_new_tokens=24, k=4, seed=0)
        std, spec, table, verdict = client.predict(prompt="Name three primary colors.", api_name="/compare", **greedy)
        assert std.strip() and std == spec, (std, spec)
        assert "Identical" in verdict, verdict
        assert {r[0] for r in table["data"]} == {"standard", "speculative"}
        a, _ = chat(client, "Name three primary colors.", mode="standard", **greedy)
        b, _ = chat(client, "Name three primary colors.", mode="speculative", **greedy)
        assert a["state"]["messages"][-1]["content"] == b["state"]["messages"][-1]["content"] == std
        assert "acceptance **" in b["stats"] and "int8" in b["stats"].lower()
    finally:
        client.close()
        demo.close()


def test_the_model_tab_names_the_decode_paths_timed_at_load():
    from types import SimpleNamespace

    from chatapp.ui.format import decode_paths

    timed = SimpleNamespace(extra={"decode_paths_ms": {"CPU kernels (avx512)": 25.71, "CPU kernels (avx2)": 21.9}})
    assert decode_paths(timed) == "CPU kernels (avx2) 21.9 ms · CPU kernels (avx512) 25.7 ms"
    assert decode_paths(SimpleNamespace(extra={"decode_paths_ms": "not timed: too little memory"})).startswith("not")
    assert decode_paths(SimpleNamespace(extra={})) == "–"
