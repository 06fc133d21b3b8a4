"""chatapp.paths: the one cache folder, shared by the model cache and the kernels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from chatapp import kernels, models, paths


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
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
