"""Typed settings: settings.toml, then environment variables, then explicit overrides (CLI flags); validation errors name the key and the file.

Precedence, lowest first: the dataclass defaults, the TOML file, environment
variables ``SPECCHAT_<SECTION>_<KEY>`` (e.g. ``SPECCHAT_DECODING_K=8``), then
explicit overrides given as dotted keys (``{"decoding.k": 8}``). Every value is
checked against its field's type and against the one rule table ``_RULES``;
a bad value raises ``SettingsError`` with a one-line message naming the dotted
key and where the value came from. Settings are never written back.

A preset (``model.preset``, one of the file's ``[presets.NAME]`` pairs) sets
``model.target`` and ``model.draft`` in the layer that names it. In the file
it wins over the file's own target and draft (the shipped file spells them
out, so a preset chosen there must replace them); in the environment and on
the command line an explicit target or draft wins over the preset beside it.
So, lowest first:

    [model] target/draft  <  [model] preset                       (the file)
      <  SPECCHAT_MODEL_PRESET  <  SPECCHAT_MODEL_TARGET/_DRAFT     (the environment)
      <  --preset  <  --target/--draft                              (the command line)

``model.preset`` then names the preset the pair came from, or is "" when the
final target and draft are not that preset's pair (a later or explicit
target or draft changed it).

Past ~400 lines because it is one table of every setting, its rule and its
source; splitting the table would split the one place a limit is stated.
"""

import dataclasses
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_SETTINGS_PATH",
    "DecodingSettings",
    "LimitsSettings",
    "ModelSettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "apply_preset",
    "load_settings",
    "with_overrides",
]

# A checkout reads the settings.toml at its root. An installed wheel or a frozen bundle has no root: it
# reads the copy the package carries (chatapp/default_settings.toml, kept identical by tests/test_packaging.py).
_CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_SETTINGS_PATH = (
    _CHECKOUT / "settings.toml"
    if (_CHECKOUT / "settings.toml").is_file() and (_CHECKOUT / "pyproject.toml").is_file()
    else Path(__file__).resolve().with_name("default_settings.toml")
)
ENV_PREFIX = "SPECCHAT_"
CONFIG_ENV_VAR = ENV_PREFIX + "CONFIG"
COMMAND_LINE = "command line"


# The limits every layer reads (settings, UI sliders, service, engine, bench).
K_MIN, K_MAX = 1, 16  # draft tokens per speculative round
TEMPERATURE_MAX = 10.0
# The smallest temperature that samples; 0 means greedy, and in between is refused. Below about
# 1e-37 the logits divided by the temperature overflow float32 to infinity and the probabilities
# to NaN; long before that sampling is greedy in all but name (at 0.01 a logit gap of 0.1 is a
# factor of e^10), so the floor sits far from the overflow and costs nothing anyone would miss.
TEMPERATURE_FLOOR = 0.01
MAX_NEW_TOKENS_MAX = 8192
SEED_MAX = 2**64 - 1  # torch generators take an unsigned 64-bit seed
# The largest chat history a prompt is built from, checked before any tokenizing: a client can send
# any history, and its size must not decide how long everyone else waits. 10,000 messages is some
# 5,000 exchanges, and 2,000,000 characters some 500,000 tokens: far past any context window, whose
# oldest turns would be dropped anyway.
HISTORY_MESSAGES_MAX = 10_000
HISTORY_CHARS_MAX = 2_000_000
# The longest message a client may send (the system prompt too): some 25,000 tokens, past the context
# of the models this app runs, so it refuses nothing that could have been answered.
MESSAGE_CHARS_MAX = 100_000


class SettingsError(ValueError):
    """A bad setting; the message is one line naming the key and its source."""


@dataclass(frozen=True)
class ModelSettings:
    target: str = "embedded:smollm2-135m-instruct"  # hub id, local folder, .gguf path, or "embedded:..."
    draft: str = ""  # "" = INT8 copy of the target
    preset: str = ""  # a [presets.NAME] pair: sets target and draft (see the precedence above); "" = none
    device: str = "auto"
    target_dtype: str = "auto"
    draft_quantization: str = "auto"
    trust_remote_code: bool = False
    max_context: int = 2048


@dataclass(frozen=True)
class DecodingSettings:
    mode: str = "speculative"
    k: int = 4
    auto_k: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    seed: int = 0
    system_prompt: str = "You are a helpful assistant."


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    open_browser: bool = True
    max_queue: int = 32  # requests that may wait for a reply; past it a client is told the server is busy
    allow_remote_images: bool = False  # Markdown images from other addresses load in the chat (a tracking channel)
    openai_api: bool = False  # serve the OpenAI-compatible /v1/chat/completions too
    # Keep conversations on disk and list them beside the chat: "on", "off", or "auto" = on only for a server
    # that this machine alone reaches (chatapp.ui.conversations_panel.saves_conversations).
    save_conversations: str = "auto"


@dataclass(frozen=True)
class LimitsSettings:
    """What the operator allows each reply: not decoding options, so no client can change them."""

    max_reply_seconds: float = 300.0  # a reply's wall clock; 0 = no limit


@dataclass(frozen=True)
class Settings:
    model: ModelSettings
    decoding: DecodingSettings
    server: ServerSettings
    presets: dict[str, dict[str, str]]  # name -> {"target", "draft", "description"}
    source: str  # path of the file read
    limits: LimitsSettings = LimitsSettings()


_SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "decoding": DecodingSettings,
    "server": ServerSettings,
    "limits": LimitsSettings,
}
_PRESET_KEYS = ("target", "draft", "description")


# --- the validation table -------------------------------------------------

_Rule = tuple[Callable[[Any], bool], str]  # (accepts value?, what to say when not)


def _one_of(*choices: str) -> _Rule:
    return (lambda v: v in choices), "is not one of " + "|".join(choices)


def _between(lo: float, hi: float) -> _Rule:
    return (lambda v: lo <= v <= hi), f"is out of range {lo}..{hi}"


def _at_least(lo: float) -> _Rule:
    return (lambda v: v >= lo), f"is out of range >= {lo}"


_RULES: dict[str, _Rule] = {
    "model.target": (bool, "must not be empty"),
    "model.device": _one_of("auto", "cpu", "cuda"),
    "model.target_dtype": _one_of("auto", "float32", "bfloat16", "float16"),
    "model.draft_quantization": _one_of("auto", "bnb-int8", "int8-weight-only", "none"),
    "model.max_context": _at_least(64),
    "decoding.mode": _one_of("speculative", "standard"),
    "decoding.k": _between(K_MIN, K_MAX),
    "decoding.temperature": (
        lambda v: v == 0 or TEMPERATURE_FLOOR <= v <= TEMPERATURE_MAX,
        f"is out of range: it must be 0 (greedy) or at least {TEMPERATURE_FLOOR}, and at most {TEMPERATURE_MAX}",
    ),
    "decoding.top_p": ((lambda v: 0 < v <= 1), "is out of range (0, 1]"),
    "decoding.top_k": _at_least(0),
    "decoding.max_new_tokens": _between(1, MAX_NEW_TOKENS_MAX),
    "decoding.seed": _between(0, SEED_MAX),
    "server.port": _between(1, 65535),
    "server.max_queue": _between(1, 10_000),
    "server.save_conversations": _one_of("auto", "on", "off"),
    "limits.max_reply_seconds": _between(0, 86_400),
}

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _fmt(value: Any) -> str:
    """A value as one short line, TOML-ish (true/false, quoted strings)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value)
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _fail(source: str, message: str) -> SettingsError:
    return SettingsError(" ".join(f"{source}: {message}".splitlines()))


def _field_types(section: str) -> dict[str, type]:
    return {f.name: f.type for f in dataclasses.fields(_SECTIONS[section])}


def _unknown_key(section: str, key: str, source: str) -> SettingsError:
    valid = ", ".join(sorted(_field_types(section)))
    return _fail(source, f"unknown key {section}.{key}; valid keys in [{section}]: {valid}")


def _check(section: str, key: str, value: Any, source: str) -> Any:
    """Type- and rule-check one value; returns it (ints widened to float where needed)."""
    types = _field_types(section)
    if key not in types:
        raise _unknown_key(section, key, source)
    want = types[key]
    dotted = f"{section}.{key}"
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise _fail(source, f"{dotted} = {_fmt(value)} must be {_TYPE_NAMES[want]}, not {_kind(value)}")
    rule = _RULES.get(dotted)
    if rule is not None and not rule[0](value):
        raise _fail(source, f"{dotted} = {_fmt(value)} {rule[1]}")
    return value


def _parse_env(section: str, key: str, raw: str, source: str) -> Any:
    """Turn an environment string into the field's type, then check it."""
    want = _field_types(section)[key]
    try:
        if want is bool:
            value: Any = _BOOL_WORDS[raw.strip().lower()]
        elif want in (int, float):
            value = want(raw.strip())
        else:
            value = raw
    except (KeyError, ValueError):
        expected = "true/false/1/0/yes/no" if want is bool else _TYPE_NAMES[want]
        raise _fail(source, f"{section}.{key} = {_fmt(raw)} is not {expected}") from None
    return _check(section, key, value, source)


# --- the three layers ------------------------------------------------------


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"settings file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise _fail(str(path), f"TOML syntax error: {exc}") from None
    except UnicodeDecodeError as exc:
        raise _fail(str(path), f"not valid UTF-8: {exc}") from None
    except OSError as exc:
        raise _fail(str(path), f"cannot read settings file: {exc.strerror or exc}") from None


def _file_layer(data: dict[str, Any], source: str) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    presets: dict[str, dict[str, str]] = {}
    valid = ", ".join(sorted([*_SECTIONS, "presets"]))
    for name, table in data.items():
        if name not in _SECTIONS and name != "presets":
            raise _fail(source, f"unknown section [{name}]; valid sections: {valid}")
        if not isinstance(table, dict):
            raise _fail(source, f"{name} = {_fmt(table)} must be a table [{name}], not {_kind(table)}")
        if name == "presets":
            presets = _check_presets(table, source)
            continue
        for key, value in table.items():
            values[name][key] = _check(name, key, value, source)
    return values, presets


def _check_presets(table: dict[str, Any], source: str) -> dict[str, dict[str, str]]:
    presets: dict[str, dict[str, str]] = {}
    for name, preset in table.items():
        where = f"presets.{name}"
        if not isinstance(preset, dict):
            raise _fail(source, f"{where} = {_fmt(preset)} must be a table [{where}], not {_kind(preset)}")
        for key, value in preset.items():
            if key not in _PRESET_KEYS:
                raise _fail(source, f"unknown key {where}.{key}; valid keys in [{where}]: {', '.join(_PRESET_KEYS)}")
            if not isinstance(value, str):
                raise _fail(source, f"{where}.{key} = {_fmt(value)} must be a string, not {_kind(value)}")
        if not preset.get("target"):
            raise _fail(source, f"{where}.target is missing or empty")
        presets[name] = {key: preset.get(key, "") for key in _PRESET_KEYS}
    return presets


def _env_layer(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :]
        for section in _SECTIONS:
            head = section.upper() + "_"
            if rest.startswith(head):
                key = rest[len(head) :].lower()
                source = f"environment variable {var}"
                if key not in _field_types(section):
                    raise _unknown_key(section, key, source)
                values[section][key] = _parse_env(section, key, env[var], source)
                break
    return values


def _override_layer(overrides: Mapping[str, object] | None, source: str) -> dict[str, dict[str, Any]]:
    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = str(dotted).partition(".")
        if section not in _SECTIONS or not key:
            valid = ", ".join(f"{s}.{k}" for s in _SECTIONS for k in _field_types(s))
            raise _fail(source, f"unknown key {dotted}; valid keys: {valid}")
        values[section][key] = _check(section, key, value, source)
    return values


def _unknown_preset(name: str, presets: Mapping[str, Any], presets_source: str, source: str) -> SettingsError:
    available = ", ".join(sorted(presets)) or "(none)"
    return _fail(
        source, f"unknown preset {name!r} (no [presets.{name}] in {presets_source}); available presets: {available}"
    )


def _spell_out_preset(
    layer: dict[str, dict[str, Any]],
    presets: Mapping[str, Mapping[str, str]],
    presets_source: str,
    source: str,
    *,
    explicit_wins: bool = True,
) -> dict[str, dict[str, Any]]:
    """The layer with its model.preset spelled out as target and draft: under the layer's own target and
    draft when `explicit_wins` (the environment, the command line), over them otherwise (the file)."""
    model = layer["model"]
    name = model.get("preset")
    if not name:
        return layer
    preset = presets.get(name)
    if preset is None:
        raise _unknown_preset(name, presets, presets_source, source)
    pair = {"target": preset["target"], "draft": preset.get("draft") or ""}
    return {**layer, "model": {**pair, **model} if explicit_wins else {**model, **pair}}


def _preset_kept(model: dict[str, Any], presets: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """model.preset stays only while the final target and draft are the preset's pair."""
    preset = presets.get(model.get("preset") or "")
    pair = (model.get("target"), model.get("draft", ""))
    if preset is not None and pair == (preset["target"], preset.get("draft") or ""):
        return model
    return {**model, "preset": ""} if "preset" in model else model


def _merge(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for layer in layers:
        for section, values in layer.items():
            merged[section].update(values)
    return merged


# --- public API ------------------------------------------------------------


def load_settings(
    path: str | os.PathLike | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Read settings: the file, then env ``SPECCHAT_<SECTION>_<KEY>``, then dotted overrides.

    ``path`` None means ``$SPECCHAT_CONFIG`` or ``DEFAULT_SETTINGS_PATH``;
    ``env`` None means ``os.environ``; override values of None are skipped.
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get(CONFIG_ENV_VAR) or DEFAULT_SETTINGS_PATH
    path = Path(path).expanduser()
    source = str(path)
    file_values, presets = _file_layer(_read_toml(path), source)
    merged = _merge(
        _spell_out_preset(file_values, presets, source, source, explicit_wins=False),
        _spell_out_preset(_env_layer(env), presets, source, f"environment variable {ENV_PREFIX}MODEL_PRESET"),
        _spell_out_preset(_override_layer(overrides, COMMAND_LINE), presets, source, COMMAND_LINE),
    )
    model = _preset_kept({**dataclasses.asdict(ModelSettings()), **merged["model"]}, presets)
    return Settings(
        model=ModelSettings(**model),
        decoding=DecodingSettings(**merged["decoding"]),
        server=ServerSettings(**merged["server"]),
        presets=presets,
        source=source,
        limits=LimitsSettings(**merged["limits"]),
    )


def with_overrides(settings: Settings, overrides: Mapping[str, object], *, source: str = COMMAND_LINE) -> Settings:
    """A copy of ``settings`` with dotted-key overrides applied (validated; None values skipped), as the
    command line's layer: a model.preset among them sets the target and draft, and an explicit target or
    draft among them wins over it."""
    layer = _spell_out_preset(_override_layer(overrides, source), settings.presets, settings.source, source)
    if layer["model"]:
        layer["model"] = _preset_kept({**dataclasses.asdict(settings.model), **layer["model"]}, settings.presets)
    return dataclasses.replace(
        settings,
        **{s: dataclasses.replace(getattr(settings, s), **layer[s]) for s in _SECTIONS if layer[s]},
    )


def apply_preset(settings: Settings, name: str) -> Settings:
    """A copy of ``settings`` whose model.target/draft come from ``[presets.NAME]``, whatever set them."""
    preset = settings.presets.get(name)
    if preset is None:
        raise _unknown_preset(name, settings.presets, settings.source, settings.source)
    model = dataclasses.replace(settings.model, target=preset["target"], draft=preset.get("draft", ""), preset=name)
    return dataclasses.replace(settings, model=model)
