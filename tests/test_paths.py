"""chatapp.paths: the cache, data and config folders, and the browser state's secret."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from chatapp import kernels, models, paths


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("SPECCHAT_CACHE_DIR", str(tmp_path))
    assert paths.cache_dir() == tmp_path
    monkeypatch.setenv("SPECCHAT_CACHE_DIR", "")  # set but empty: the default
    assert paths.cache_dir() == Path.home() / ".cache" / "specchat"
    monkeypatch.delenv("SPECCHAT_CACHE_DIR")
    assert paths.cache_dir() == Path.home() / ".cache" / "specchat"


def test_models_and_kernels_use_the_same_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECCHAT_CACHE_DIR", str(tmp_path))
    assert models.cache_dir() == tmp_path
    assert kernels.build_dir() == tmp_path / "kernels"
    monkeypatch.setenv("SPECCHAT_CACHE_DIR", "~/specchat-elsewhere")
    assert kernels.build_dir() == Path.home() / "specchat-elsewhere" / "kernels"


def test_paths_imports_nothing_of_ours():
    # chatapp.kernels imports it and chatapp.models imports chatapp.llama, which imports chatapp.kernels:
    # anything of ours imported here could close a circle.
    code = "import sys, chatapp.paths; print(sorted(m for m in sys.modules if m.startswith('chatapp')))"
    root = Path(__file__).resolve().parent.parent
    loaded = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['chatapp', 'chatapp.paths']"


@pytest.mark.parametrize(
    ("function", "variable", "xdg", "default"),
    [
        (paths.cache_dir, "SPECCHAT_CACHE_DIR", "XDG_CACHE_HOME", ".cache"),
        (paths.data_dir, "SPECCHAT_DATA_DIR", "XDG_DATA_HOME", ".local/share"),
        (paths.config_dir, "SPECCHAT_CONFIG_DIR", "XDG_CONFIG_HOME", ".config"),
    ],
)
def test_each_folder_is_its_variable_else_the_xdg_folder(monkeypatch, tmp_path, function, variable, xdg, default):
    if sys.platform != "linux":
        pytest.skip("XDG folders are the Linux defaults")
    monkeypatch.delenv(xdg, raising=False)
    monkeypatch.delenv(variable, raising=False)
    assert function() == Path.home() / default / "specchat"
    monkeypatch.setenv(xdg, str(tmp_path / "xdg"))
    assert function() == tmp_path / "xdg" / "specchat"
    monkeypatch.setenv(variable, str(tmp_path / "mine"))  # the app's own variable wins
    assert function() == tmp_path / "mine"
    monkeypatch.setenv(variable, "")
    assert function() == tmp_path / "xdg" / "specchat"


def test_state_secret_is_kept_private_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECCHAT_CONFIG_DIR", str(tmp_path / "config"))
    secret = paths.state_secret()
    stored = tmp_path / "config" / "state-secret"
    assert len(secret) >= 32 and stored.read_text().strip() == secret
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert paths.state_secret() == secret
    # Another process (the next start of the app) reads the same one.
    code = "from chatapp.paths import state_secret; print(state_secret())"
    env = {**os.environ, "SPECCHAT_CONFIG_DIR": str(tmp_path / "config")}
    root = Path(__file__).resolve().parent.parent
    assert (
        subprocess.run(
            [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        == secret
    )
    assert sorted(p.name for p in (tmp_path / "config").iterdir()) == ["state-secret"]
    stored.chmod(0o644)  # widened by someone: narrowed again on reading
    assert paths.state_secret() == secret and stat.S_IMODE(stored.stat().st_mode) == 0o600


def test_state_secret_replaces_an_unusable_file(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECCHAT_CONFIG_DIR", str(tmp_path))
    (tmp_path / "state-secret").write_text("short\n")
    secret = paths.state_secret()
    assert len(secret) >= 32 and (tmp_path / "state-secret").read_text().strip() == secret


def test_state_secret_survives_an_unwritable_config_folder(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SPECCHAT_CONFIG_DIR", str(blocker / "config"))  # cannot be created under a file
    assert len(paths.state_secret()) >= 32
