"""Load (issue 11): many clients at once through the API on 127.0.0.1, and many turns in one process,
over the scripted fake service (tests/fake_engine.py) with a small delay per round."""

from __future__ import annotations

import gc
import json
import threading
import time
import tracemalloc

import pytest
from fake_engine import FakeService
from served import EMPTY, client, served

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # Gradio's queue statistics

CLIENTS, TURNS = 8, 5
DEADLINE_S = 240  # all 40 replies; each takes ~0.2 s of rounds, so the queue and the clients' turns dominate
MEMORY_TURNS = 80
# Bytes the server side may keep per turn: Gradio keeps ~31 kB a turn (6.2 MiB after 200 turns; see the
# test), linearly, so 80 turns (40 s under tracemalloc, against 100 s for 200) resolve a leak as well.
MEMORY_BOUND = MEMORY_TURNS * 40 * 2**10


class Recorded:
    """A fake turn that files its record under its text once it has ended."""

    def __init__(self, turn, records: dict):
        self._turn, self._records = turn, records

    def __getattr__(self, name):
        return getattr(self._turn, name)

    def __iter__(self):
        yield from self._turn
        self._records[self._turn.text] = json.loads(json.dumps(self._turn.record()))


class RecordingService(FakeService):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.records: dict[str, dict] = {}  # a reply's text -> the record of the turn that made it

    def start_turn(self, history, decoding, system=None, *, fresh=False):
        return Recorded(super().start_turn(history, decoding, system, fresh=fresh), self.records)


def test_eight_clients_five_turns_each_at_once():
    service = RecordingService(delay=0.01)
    records = service.records
    ranks: list[int] = []
    failures: list[BaseException] = []
    conversations: dict[int, list[tuple[str, str, dict]]] = {}

    with served(service) as (_, url):

        def converse(number: int) -> None:
            c = client(url)
            history, said = [], []
            try:
                for turn in range(TURNS):
                    message = f"client {number} turn {turn}"
                    job = c.submit(message, history, {"seed": number}, api_name="/chat")
                    while not job.done():
                        status = job.status()
                        if status.rank is not None and status.rank > 0:
                            ranks.append(status.rank)
                        time.sleep(0.01)
                    reply, stats = job.result(timeout=60)
                    said.append((message, reply, stats))
                    history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
            except BaseException as error:  # reported below
                failures.append(error)
            finally:
                conversations[number] = said
                c.close()

        started = time.monotonic()
        threads = [threading.Thread(target=converse, args=(n,)) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=DEADLINE_S)
        took = time.monotonic() - started

    assert not failures, failures
    assert took < DEADLINE_S and all(len(said) == TURNS for said in conversations.values()), took
    assert len(service.turns) == len(records) == CLIENTS * TURNS
    for number, said in conversations.items():
        for message, reply, stats in said:
            assert reply.startswith(f"You said: {message}.") and f"client {number} " in reply  # its own text
            assert stats == records[reply], "the stats are the record of the very turn that made the reply"
            assert stats["new_tokens"] > 0 and stats["stop_reason"] == "eos"
    histories = service.histories
    for number in range(CLIENTS):
        own = [h for h in histories if h[-1]["content"].startswith(f"client {number} ")]
        assert [len(h) for h in own] == [1, 3, 5, 7, 9]  # each turn saw that client's conversation, whole
        assert all(m["content"].startswith(f"client {number} ") or m["role"] == "assistant" for h in own for m in h)
    assert ranks and max(ranks) >= 2, "waiting clients should be told their place in the queue"


def test_many_turns_in_one_process_stay_within_a_memory_bound():
    """The process keeps less than MEMORY_BOUND after MEMORY_TURNS more turns (page chat and /chat), counted by
    tracemalloc at the allocating line, leaving out the test's own client (gradio_client, httpx, the
    json it parses). What stays is Gradio's: each reply leaves copies of the five components whose
    update it skipped (gr.skip(): the message box, the stored chat, the notice, the table, the summary)
    in its session's state, ~30 kB a reply (Gradio 6.31 drops them with the session: an hour after its
    page closes, or past 10,000 sessions). The app's own bookkeeping is checked exactly."""
    service = FakeService()
    with served(service) as (demo, url):
        handlers = demo.specchat_handlers
        c = client(url)
        try:
            state = EMPTY

            def turn(number: int) -> None:
                nonlocal state
                out = c.submit(message=f"turn {number % 10}", chat_state=state, api_name="/send").result(timeout=60)
                state = {"messages": out[2]["messages"][-4:]}  # a chat that stays short, as a page would clear it
                c.predict(f"turn {number % 10}", [], api_name="/chat")
                service.turns.clear(), service.histories.clear(), service.fresh.clear()  # the fake's own log

            for number in range(20):  # warm: caches, first-call imports, Gradio's lazily built state
                turn(number)
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            for number in range(MEMORY_TURNS):
                turn(number)
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
        finally:
            c.close()
        # The app's own: one session, no prompt left on the desk, nobody waiting, nothing arriving.
        assert len(handlers.sessions._sessions) == 1 and len(handlers.desk) == 0
        assert handlers.handle.slot.waiting == 0 and not handlers.handle.slot.busy and handlers.admission.arriving == 0
    client_side = ("gradio_client", "httpx", "httpcore", "/json/")
    server = [tracemalloc.Filter(False, f"*{part}*") for part in client_side]
    diff = after.filter_traces(server).compare_to(before.filter_traces(server), "lineno")
    growth = sum(stat.size_diff for stat in diff)
    top = "\n".join(str(stat) for stat in diff[:8])
    assert growth < MEMORY_BOUND, f"{growth / 2**20:.1f} MiB kept after {MEMORY_TURNS} turns:\n{top}"
