"""The frozen one-folder bundle (packaging/desktop/bundle.sh) starts with the embedded model it carries.

Building the bundle takes minutes, so this is not part of `make test`: `make test-bundle` builds
dist/specchat and runs this file with SPECCHAT_TEST_BUNDLE pointing at it. The bundle starts as a
new user's first start would: empty cache, data and config folders, no Python environment, no
network needed for the model (its GGUF file is inside the bundle), under Xvfb.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from test_desktop import (  # noqa: F401 -- `display` is a fixture
    ARTIFACTS,
    app_window,
    close_like_a_user,
    display,
    get_json,
    instance,
    port_open,
    screenshot,
    stop,
    wait_until,
)

from chatapp import desktop

BUNDLE = os.environ.get("SPECCHAT_TEST_BUNDLE")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BUNDLE, reason="run by `make test-bundle`, which builds the bundle first (minutes)"),
]


def bundle_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "SPECCHAT_EMBEDDED_WHEEL", "SPECCHAT_CONFIG")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SPECCHAT_")}
    env.update(
        SPECCHAT_CACHE_DIR=str(tmp_path / "cache"),
        SPECCHAT_DATA_DIR=str(tmp_path / "data"),
        SPECCHAT_CONFIG_DIR=str(tmp_path / "config"),
        HF_HUB_OFFLINE="1",
        PIP_NO_INDEX="1",
        **extra,
    )
    env["PATH"] = "/usr/bin:/bin"  # not this checkout's .venv
    return env


def test_the_bundle_answers_help_without_python(tmp_path):
    helped = subprocess.run(
        [str(Path(BUNDLE) / "specchat"), "--help"],
        cwd=tmp_path,
        env=bundle_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: specchat")


def test_the_bundle_starts_with_the_embedded_model_in_its_window(display, tmp_path):  # noqa: F811
    from gradio_client import Client

    env = bundle_env(tmp_path, DISPLAY=display)
    app = subprocess.Popen(
        [str(Path(BUNDLE) / "specchat")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    started = time.monotonic()
    try:
        window = wait_until(lambda: app_window(display), 300, "the window", app)
        published = wait_until(lambda: instance(tmp_path), 300, "the server", app)
        url = f"http://{desktop.HOST}:{published['port']}/"
        wait_until(lambda: get_json(f"{url}specchat/status")["status"] != "loading", 900, "the models", app)
        status = get_json(f"{url}specchat/status")
        assert status["status"] == "ready", status
        # A first start: the GGUF file the bundle carries was converted into the (empty) cache.
        assert any("converting SmolLM2-135M-Instruct.Q4_1.gguf" in line for line in status["progress"])
        assert (tmp_path / "cache" / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
        ready_s = time.monotonic() - started

        client = Client(url, verbose=False)
        job = client.submit(message="Name a primary color.", chat_state={"messages": []}, api_name="/send")
        job.result(timeout=300)
        assert len(job.outputs()) >= 3
        client.close()
        time.sleep(1)
        screenshot(display, window, ARTIFACTS / "bundle-window.png")
        close_like_a_user(display, window)
        assert app.wait(timeout=60) == 0
        assert not port_open(published["port"])
        print(f"bundle: ready {ready_s:.0f} s after start (first start: conversion included)")
    finally:
        stop(app)
