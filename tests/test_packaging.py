"""The desktop app's packaging: its menu entry and icons, and the wheel (the Spaces bundle: tests/test_spaces.py)."""

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# --- the desktop app: its menu entry, icons and installable package ---------------------------------------------

DESKTOP = ROOT / "packaging" / "desktop"
ASSETS = ROOT / "chatapp" / "assets"
ICON_SIZES = (48, 128, 256)


def _install_entry(tmp_path: Path, executable: Path, path_dirs: str | None = None) -> tuple[Path, dict]:
    data_home = tmp_path / "data home"  # a space in the XDG folder too
    env = {**os.environ, "XDG_DATA_HOME": str(data_home), "HOME": str(tmp_path / "home")}
    if path_dirs is not None:
        env["PATH"] = path_dirs
    done = subprocess.run(
        ["bash", str(DESKTOP / "install.sh"), "--exec", str(executable)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return data_home, env


def _fake_specchat(tmp_path: Path) -> tuple[Path, Path]:
    """An executable at a path with a space (and a $ and a quote) that records that it was started."""
    folder = tmp_path / "My Apps" / 'spec $chat "v1"'
    folder.mkdir(parents=True)
    marker = tmp_path / "started"
    executable = folder / "specchat"
    executable.write_text(f'#!/bin/sh\necho "$0" > "{marker}"\n')
    executable.chmod(0o755)
    return executable, marker


def _installed_files(data_home: Path) -> set[str]:
    return {str(p.relative_to(data_home)) for p in data_home.rglob("*") if p.is_file() and "cache" not in p.name}


EXPECTED_FILES = {
    "applications/specchat.desktop",
    "icons/hicolor/scalable/apps/specchat.svg",
    *(f"icons/hicolor/{s}x{s}/apps/specchat.png" for s in ICON_SIZES),
}


def test_desktop_entry_installs_validates_and_starts_the_app_from_a_path_with_a_space(tmp_path):
    if shutil.which("desktop-file-validate") is None:
        pytest.skip("desktop-file-validate is not installed (`make setup` installs Debian's desktop-file-utils)")
    executable, marker = _fake_specchat(tmp_path)
    data_home, env = _install_entry(tmp_path, executable)
    assert _installed_files(data_home) == EXPECTED_FILES
    entry = data_home / "applications" / "specchat.desktop"
    validated = subprocess.run(["desktop-file-validate", str(entry)], capture_output=True, text=True)
    assert validated.returncode == 0 and validated.stdout + validated.stderr == "", validated.stdout
    fields = dict(line.split("=", 1) for line in entry.read_text().splitlines() if "=" in line)
    assert fields["Terminal"] == "false" and fields["Icon"] == "specchat" and fields["StartupWMClass"] == "SpecChat"
    assert fields["Categories"].endswith(";") and fields["Exec"].startswith('"')
    for size in ICON_SIZES:
        installed = data_home / f"icons/hicolor/{size}x{size}/apps/specchat.png"
        assert installed.read_bytes() == (ASSETS / f"specchat-{size}.png").read_bytes()

    # The menu's own parser (GLib's) reads the quoted Exec back as the one path, and launching the entry starts it.
    gi = pytest.importorskip("gi", reason="GLib's Python bindings (python3-gi) are not installed")
    gi.require_version("Gio", "2.0")
    from gi.repository import Gio, GLib

    info = Gio.DesktopAppInfo.new_from_filename(str(entry))
    assert GLib.shell_parse_argv(info.get_commandline())[1] == [str(executable)]
    assert info.launch([], None)
    deadline = time.monotonic() + 10
    while not (marker.exists() and marker.read_text().endswith("\n")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text().strip() == str(executable)

    removed = subprocess.run(["bash", str(DESKTOP / "uninstall.sh")], env=env, capture_output=True, text=True)
    assert removed.returncode == 0, removed.stderr
    assert _installed_files(data_home) == set()


def test_desktop_entry_installs_with_only_the_basic_tools(tmp_path):
    # No xdg-utils, no cache tools, no Python on PATH: a bundle's user may have nothing more.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "mkdir", "cp", "mktemp", "rm", "dirname", "sed"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    executable, _ = _fake_specchat(tmp_path)
    data_home, env = _install_entry(tmp_path, executable, path_dirs=str(bin_dir))
    assert _installed_files(data_home) == EXPECTED_FILES
    entry = (data_home / "applications" / "specchat.desktop").read_text()
    assert "Exec=" + r'"' + str(executable).replace("$", r"\\$").replace('"', r'\\"') + '"' in entry
    subprocess.run(["bash", str(DESKTOP / "uninstall.sh")], env=env, check=True, capture_output=True)
    assert _installed_files(data_home) == set()


def test_icon_pngs_are_renders_of_the_svg(tmp_path):
    if shutil.which("rsvg-convert") is None or shutil.which("compare") is None:
        pytest.skip("rsvg-convert or ImageMagick is not installed (`make setup` installs librsvg2-bin, imagemagick)")
    subprocess.run(["bash", str(DESKTOP / "icons.sh"), str(tmp_path)], check=True, capture_output=True)
    for size in ICON_SIZES:
        committed, fresh = ASSETS / f"specchat-{size}.png", tmp_path / f"specchat-{size}.png"
        differing = subprocess.run(
            ["compare", "-metric", "AE", str(committed), str(fresh), "null:"], capture_output=True, text=True
        ).stderr.strip()
        assert differing == "0", f"{committed.name}: {differing} pixels differ (run packaging/desktop/icons.sh)"


def test_the_packaged_default_settings_are_the_checkouts():
    assert (ROOT / "chatapp" / "default_settings.toml").read_text() == (ROOT / "settings.toml").read_text(), (
        "settings.toml changed: cp settings.toml chatapp/default_settings.toml (the copy a wheel carries)"
    )


def test_the_wheel_installs_into_a_fresh_venv_whose_specchat_works(tmp_path):
    # Built from a copy of what the wheel is made of: setuptools writes build/ and *.egg-info into the source folder.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "chatapp", source / "chatapp", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    # No build isolation: setuptools from this environment, no download.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("specchat-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for carried in (
        "chatapp/kernels/cpu_kernels.cpp",
        "chatapp/default_settings.toml",
        "chatapp/assets/specchat.svg",
        "chatapp/assets/specchat-256.png",
        "chatapp/assets/loading.html",
        "chatapp/desktop.py",
        "chatapp/conversations.py",
    ):
        assert carried in names, carried
    assert "specchat = chatapp.cli:main" in entry_points

    # A fresh venv; the dependencies (gigabytes) are borrowed from this one's site-packages instead of downloaded.
    venv = tmp_path / "fresh venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPECCHAT_CONFIG")}
    helped = subprocess.run(
        [str(venv / "bin" / "specchat"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: specchat") and "desktop" in helped.stdout
    # The installed package, not the checkout, reading the settings it carries.
    code = (
        "import chatapp, chatapp.settings as s; print(chatapp.__file__); print(s.DEFAULT_SETTINGS_PATH); "
        "print(s.load_settings().model.target)"
    )
    where, settings_path, target = subprocess.run(
        [str(python), "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    ).stdout.split("\n")[:3]
    assert where.startswith(purelib) and settings_path == f"{purelib}/chatapp/default_settings.toml"
    assert target == "embedded:smollm2-135m-instruct"
