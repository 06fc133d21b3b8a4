"""The Spaces bundle and the desktop entry are built the way the README says."""

import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_space_bundle_has_app_and_front_matter(tmp_path):
    out = tmp_path / "space"
    subprocess.run(["bash", str(ROOT / "packaging/spaces/build.sh"), str(out)], check=True, capture_output=True)
    for name in ("app.py", "main.py", "settings.toml", "requirements.txt", "chatapp/engine.py", "chatapp/kernels/cpu_kernels.cpp"):
        assert (out / name).is_file(), name
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\n") and "sdk: gradio" in readme and "app_file: app.py" in readme
    assert not list(out.rglob("__pycache__"))


def test_space_app_binds_all_interfaces_on_port_7860(monkeypatch):
    monkeypatch.delenv("PORT", raising=False)
    module = runpy.run_path(str(ROOT / "packaging/spaces/app.py"), run_name="space_app")
    assert module["space_args"]() == ["serve", "--host", "0.0.0.0", "--port", "7860", "--no-browser"]


def test_desktop_entry_points_at_launcher(tmp_path):
    subprocess.run(["bash", str(ROOT / "packaging/desktop/install.sh"), str(tmp_path)], check=True, capture_output=True)
    entry = (tmp_path / "specchat.desktop").read_text()
    launcher = ROOT / "packaging/desktop/specchat-launcher.sh"
    assert f"Exec={launcher}" in entry
    assert launcher.stat().st_mode & 0o111
