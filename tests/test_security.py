"""Who may use the app, what it warns about, and what it logs (issue 11, security): authentication from
the environment or the config folder and never the repository, the warning for an app reachable
beyond this machine without it, and no user text or model output in the server's output."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest
from fake_engine import FakeService, FakeTurn
from gradio_client import Client
from served import EMPTY, client, free_port, served, settings_with

from chatapp.settings import SettingsError, load_settings
from chatapp.ui.auth import AuthError, credentials, exposure_warning

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # Gradio's queue statistics

MARK = "zebra-7431"  # in every message, history and value sent below; must reach no log


@pytest.fixture
def no_auth(monkeypatch, tmp_path):
    """No account anywhere: the environment's cleared, the config folder empty."""
    for name in ("SPECCHAT_AUTH", "SPECCHAT_AUTH_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPECCHAT_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path


# --- where the accounts come from -------------------------------------------------------------------


def test_accounts_come_from_the_environment_a_file_or_the_config_folder(no_auth, monkeypatch):
    assert credentials() is None
    accounts = no_auth / "accounts"
    accounts.write_text("# who may sign in\nann:pw one\n\nbob:two:colons\n")
    monkeypatch.setenv("SPECCHAT_AUTH_FILE", str(accounts))
    assert credentials() == [("ann", "pw one"), ("bob", "two:colons")]
    monkeypatch.setenv("SPECCHAT_AUTH", "cy:secret")  # the variable comes first
    assert credentials() == [("cy", "secret")]
    monkeypatch.delenv("SPECCHAT_AUTH"), monkeypatch.delenv("SPECCHAT_AUTH_FILE")
    (no_auth / "config").mkdir()
    (no_auth / "config" / "auth").write_text("dee:pass\n")
    assert credentials() == [("dee", "pass")]


@pytest.mark.parametrize(
    "value, where",
    [
        ("no-colon-secret", "environment variable SPECCHAT_AUTH"),
        (":secret-only", "environment variable SPECCHAT_AUTH"),
        ("user:", "environment variable SPECCHAT_AUTH"),
    ],
)
def test_a_malformed_account_is_one_line_that_never_shows_the_password(no_auth, monkeypatch, value, where):
    monkeypatch.setenv("SPECCHAT_AUTH", value)
    with pytest.raises(AuthError) as refused:
        credentials()
    assert str(refused.value).startswith(where) and "secret" not in str(refused.value)
    monkeypatch.delenv("SPECCHAT_AUTH")
    monkeypatch.setenv("SPECCHAT_AUTH_FILE", str(no_auth / "missing"))
    with pytest.raises(AuthError, match="cannot read"):
        credentials()


def test_the_repositorys_settings_file_cannot_hold_accounts(tmp_path):
    settings = tmp_path / "settings.toml"
    settings.write_text('[server]\nauth = "ann:secret"\n')
    with pytest.raises(SettingsError, match=r"unknown key server\.auth"):
        load_settings(settings, env={})


# --- the warning and the sign-in -------------------------------------------------------------------------


def test_the_warning_is_for_an_app_reachable_beyond_loopback_without_authentication():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, False, False) is None
    for host, share in (("0.0.0.0", False), ("192.168.1.20", False), ("my-host", False), ("127.0.0.1", True)):
        line = exposure_warning(host, share, False)
        assert line.startswith("warning: the app is reachable") and "SPECCHAT_AUTH" in line, (host, share)
        assert exposure_warning(host, share, True) is None


def test_serving_on_all_interfaces_warns_at_start_unless_it_needs_a_sign_in(no_auth, capfd):
    with served(FakeService(), host="0.0.0.0"):
        pass
    assert (
        "warning: the app is reachable on 0.0.0.0, from other machines without authentication" in capfd.readouterr().err
    )
    with served(FakeService(), host="0.0.0.0", auth=[("ann", "pw")]):
        pass
    with served(FakeService()):
        pass
    assert "warning" not in capfd.readouterr().err


def test_with_an_account_in_the_environment_the_app_asks_for_it(no_auth, monkeypatch):
    monkeypatch.setenv("SPECCHAT_AUTH", "ann:s3cret")
    service = FakeService()
    with served(service, settings_with(openai_api=True)) as (_, url):
        with pytest.raises(Exception):
            Client(url, verbose=False).predict("hi", api_name="/chat")
        assert httpx.get(f"{url}gradio_api/info", timeout=30).status_code == 401
        wrong = None
        try:
            wrong = Client(url, auth=("ann", "wrong"), verbose=False)
        except Exception:
            pass
        assert wrong is None, "a wrong password must not sign in"
        ann = Client(url, auth=("ann", "s3cret"), verbose=False)
        reply, _ = ann.predict("hi", api_name="/chat")
        assert reply == service.last.text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "v1", api_key="ann:wrong", max_retries=0).models.list()
        ann.close()


# --- what reaches the logs ----------------------------------------------------------------------------------


def test_no_user_text_or_model_output_reaches_the_logs(no_auth, capfd, caplog, recwarn, monkeypatch):
    caplog.set_level(logging.WARNING)  # the default level
    service = FakeService()
    original = FakeTurn._round

    def failing(self, i):  # a reply that fails mid-way, with the user's text in the error
        if service.histories[-1][-1]["content"] == f"{MARK} fail" and i == 2:
            raise RuntimeError(f"kernel exploded near {MARK}")
        return original(self, i)

    monkeypatch.setattr(FakeTurn, "_round", failing)
    with served(service, settings_with(openai_api=True)) as (_, url):
        c = client(url)
        history = [{"role": "user", "content": f"earlier {MARK}"}, {"role": "assistant", "content": f"said {MARK}"}]
        state = {"messages": [*history, {"role": "assistant", "content": MARK, "stats": {"mode": MARK}}]}
        c.predict(message=f"hello {MARK}", chat_state=state, system_prompt=f"sys {MARK}", api_name="/send")
        assert MARK in service.last.text  # the model's output holds it too
        c.predict(message=f"{MARK} fail", chat_state=EMPTY, api_name="/send")
        c.predict(message=MARK, chat_state=EMPTY, k=MARK, api_name="/send")
        c.predict(message=MARK * 30_000, chat_state=EMPTY, api_name="/send")
        c.predict(chat_state=state, k=MARK, api_name="/stats")
        c.predict(chat_state=state, api_name="/restore")
        c.predict(prompt=MARK, seed=2**70, api_name="/compare")
        for bad in (dict(settings={"k": MARK}), dict(history=[{"role": MARK, "content": MARK}]), dict(settings=[MARK])):
            with pytest.raises(Exception):
                c.predict(f"hi {MARK}", api_name="/chat", **bad)
        c.predict(f"hi {MARK}", history, api_name="/chat")
        llm = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
        llm.chat.completions.create(model="m", messages=[{"role": "user", "content": MARK}])
        with pytest.raises(openai.BadRequestError):
            llm.chat.completions.create(model="m", messages=[{"role": "user", "content": MARK}], extra_body={"k": MARK})
        stats = httpx.post(
            f"{url}gradio_api/run/stats",
            content=f'{{"data": [{{"messages": []}}, "{MARK}"]}}',
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert f"decoding.k = '{MARK}' is not a number" in stats.text  # told to the client, and only to it
        c.close()
    logged = capfd.readouterr()
    warned = "\n".join(str(w.message) for w in recwarn)  # printed to the terminal outside pytest
    for where, text in (("stdout", logged.out), ("stderr", logged.err), ("logging", caplog.text), ("warnings", warned)):
        assert MARK not in text, f"{where} holds user text or model output:\n{text[-3000:]}"


def test_the_server_binds_the_loopback_by_default(no_auth):
    from chatapp import ui

    demo = ui.build_app(FakeService(), settings_with())
    try:
        ui.launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
        assert demo.server_name == "127.0.0.1"
    finally:
        demo.close()
