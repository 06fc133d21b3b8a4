"""Who may use the app once it is reachable from other machines: optional
username/password authentication, and a warning when there is none.

Contract: `credentials(env)` returns the accounts as [(user, password)], or
None when none are set. They come from, in order: $SPECCHAT_AUTH
("user:password"), the file named by $SPECCHAT_AUTH_FILE, or the file `auth`
in the app's config folder (chatapp.paths.config_dir()) if it exists. A file
holds one "user:password" per line; blank lines and lines starting with "#"
are skipped. Never from the repository: settings.toml has no such key, since
a checkout is shared and committed. A malformed value raises AuthError (one
line, naming where it came from, never the password).

`exposure_warning(host, share, authenticated)` is the line to print at start
when the app is reachable beyond this machine (another address than
loopback, or a share link) without authentication, else None.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

from ..paths import config_dir

AUTH_ENV = "SPECCHAT_AUTH"
AUTH_FILE_ENV = "SPECCHAT_AUTH_FILE"
AUTH_FILE_NAME = "auth"  # in the config folder
LOOPBACK_NAMES = ("localhost",)


class AuthError(ValueError):
    """Authentication is set, but not readably; the message is one line without the password."""


def _account(text: str, where: str) -> tuple[str, str]:
    user, colon, password = text.strip().partition(":")
    if not colon or not user or not password:
        raise AuthError(f'{where}: expected "user:password" (both non-empty)')
    return user, password


def _read_file(path: Path, where: str) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise AuthError(f"{where}: cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    accounts = [
        _account(line, f"{where}, line {number}")
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not accounts:
        raise AuthError(f'{where}: {path} holds no "user:password" line')
    return accounts


def credentials(env: Mapping[str, str] | None = None) -> list[tuple[str, str]] | None:
    """The accounts that may sign in (see the module docstring); None: no authentication."""
    env = os.environ if env is None else env
    if env.get(AUTH_ENV):
        return [_account(env[AUTH_ENV], f"environment variable {AUTH_ENV}")]
    if env.get(AUTH_FILE_ENV):
        return _read_file(Path(env[AUTH_FILE_ENV]).expanduser(), f"environment variable {AUTH_FILE_ENV}")
    default = config_dir() / AUTH_FILE_NAME
    if default.is_file():
        return _read_file(default, "the config folder's auth file")
    return None


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, share: bool, authenticated: bool) -> str | None:
    """The warning for an app reachable from other machines without authentication, or None."""
    if authenticated or (is_loopback(host) and not share):
        return None
    where = "through a public share link" if share else f"on {host}, from other machines"
    return (
        f"warning: the app is reachable {where} without authentication: anyone who reaches it can chat "
        f"and use this machine. Set {AUTH_ENV}=\"user:password\" (or {AUTH_FILE_ENV}, or an '{AUTH_FILE_NAME}' "
        f"file in {config_dir()}) to require a sign-in."
    )
