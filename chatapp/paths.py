"""Where SpecChat keeps things on this machine: the cache, the user's data, its configuration.

Contract: each function is the one answer to "where is ...?":

    cache_dir()   what is built once per machine and can be rebuilt: converted models
                  (cache_dir()/models, chatapp.models) and compiled kernels
                  (cache_dir()/kernels, chatapp.kernels)
    data_dir()    what the user would miss: conversations (chatapp.conversations) and
                  the running instance's lock and port (chatapp.desktop)
    config_dir()  the app's own configuration: the browser state's secret

Each is $SPECCHAT_CACHE_DIR, $SPECCHAT_DATA_DIR or $SPECCHAT_CONFIG_DIR when set
and not empty, else the platform's folder from platformdirs (on Linux the XDG
ones: ~/.cache/specchat, ~/.local/share/specchat, ~/.config/specchat; on
Windows and macOS their AppData and Library counterparts). The folders are not
created here; only `state_secret()` writes, and only its one file.

It imports nothing of ours: chatapp.kernels is imported by chatapp.llama,
which chatapp.models imports, so a path helper anywhere above would be a
circular import.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import platformdirs

APP_NAME = "specchat"
CACHE_ENV = "SPECCHAT_CACHE_DIR"
DATA_ENV = "SPECCHAT_DATA_DIR"
CONFIG_ENV = "SPECCHAT_CONFIG_DIR"  # not SPECCHAT_CONFIG: that one names a settings file (chatapp.settings)
DEFAULT_CACHE_DIR = platformdirs.user_cache_path(APP_NAME, appauthor=False)  # at import; cache_dir() asks anew

STATE_SECRET_FILE = "state-secret"
SECRET_BYTES = 32  # 43 URL-safe characters
PRIVATE_FILE = 0o600


def _from_env(variable: str, default: Path) -> Path:
    return Path(os.environ.get(variable) or default).expanduser()


def cache_dir() -> Path:
    """Where converted models and compiled kernels live: $SPECCHAT_CACHE_DIR or the platform's cache folder."""
    return _from_env(CACHE_ENV, platformdirs.user_cache_path(APP_NAME, appauthor=False))


def data_dir() -> Path:
    """Where conversations and the running instance's files live: $SPECCHAT_DATA_DIR or the platform's data folder."""
    return _from_env(DATA_ENV, platformdirs.user_data_path(APP_NAME, appauthor=False))


def config_dir() -> Path:
    """Where the app's own configuration lives: $SPECCHAT_CONFIG_DIR or the platform's config folder."""
    return _from_env(CONFIG_ENV, platformdirs.user_config_path(APP_NAME, appauthor=False))


def state_secret() -> str:
    """The secret that encrypts the chat Gradio keeps in the browser (gr.BrowserState(secret=...)).

    Gradio draws a new one per process unless given one, and a chat stored under
    the old secret no longer decrypts: the history was lost at every restart. This
    one is drawn once and kept in config_dir()/state-secret, readable by the user
    only. Two processes starting at once agree on one: the first file linked into
    place wins and the other reads it. Where the config folder cannot be written,
    the secret lasts this process only (Gradio's own behaviour), rather than the
    app failing to start."""
    path = config_dir() / STATE_SECRET_FILE
    try:
        return _read_secret(path) or _store_new_secret(path)
    except OSError:
        return secrets.token_urlsafe(SECRET_BYTES)


def _read_secret(path: Path) -> str | None:
    """The stored secret, its permissions narrowed to the user if they were wider; None if absent or unusable."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    if len(text) < SECRET_BYTES:
        return None
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(PRIVATE_FILE)
    return text


def _store_new_secret(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and _read_secret(path) is None:
        # There but unusable (truncated, not ASCII): a browser state encrypted
        # under it cannot be read anyway, so a fresh secret loses nothing.
        path.unlink()
    draft = path.with_name(f".{STATE_SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secrets.token_urlsafe(SECRET_BYTES) + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(draft, path)  # fails if another process got there first: then its secret is the one
        except FileExistsError:
            pass
    finally:
        draft.unlink(missing_ok=True)
    secret = _read_secret(path)
    if secret is None:
        raise OSError(f"cannot read back {path}")
    return secret
