"""Tests for chatapp.settings: file, environment and override layers, and validation."""

import dataclasses
import os
import tomllib

import pytest

from chatapp.settings import (
    DEFAULT_SETTINGS_PATH,
    TEMPERATURE_FLOOR,
    DecodingSettings,
    LimitsSettings,
    ModelSettings,
    ServerSettings,
    SettingsError,
    apply_preset,
    load_settings,
    with_overrides,
)

FLOOR_MESSAGE = "must be 0 (greedy) or at least 0.01"
SECTIONS = {"model": ModelSettings, "decoding": DecodingSettings, "server": ServerSettings, "limits": LimitsSettings}

PRESETS_TOML = """
[presets.big]
target = "org/Big-7B"
draft = "org/Small-0.5B"
description = "big one"

[presets.solo]
target = "org/Solo-1B"
"""


@pytest.fixture
def write_toml(tmp_path):
    """Write TOML text to a fresh file under tmp_path and return its path."""
    counter = iter(range(1000))

    def write(text: str, name: str | None = None):
        path = tmp_path / (name or f"settings_{next(counter)}.toml")
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def settings_file(write_toml):
    return write_toml('[decoding]\nk = 5\ntemperature = 0.7\n\n[model]\ntarget = "from-file"\n' + PRESETS_TOML)


def expect_error(*fragments: str, **kwargs) -> SettingsError:
    """load_settings(**kwargs) must raise a one-line SettingsError containing all fragments."""
    kwargs.setdefault("env", {})
    with pytest.raises(SettingsError) as info:
        load_settings(**kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


# --- the repository's settings.toml ---------------------------------------------


def test_repo_settings_file_matches_dataclass_defaults():
    raw = tomllib.loads(DEFAULT_SETTINGS_PATH.read_text(encoding="utf-8"))
    settings = load_settings(env={})
    assert settings.source == str(DEFAULT_SETTINGS_PATH)
    checked = 0
    for section, cls in SECTIONS.items():
        assert set(raw[section]) <= {f.name for f in dataclasses.fields(cls)}
        for key, value in raw[section].items():
            assert getattr(cls(), key) == value, f"{section}.{key}"
            assert getattr(getattr(settings, section), key) == value
            checked += 1
    assert checked >= 15  # the file spells out the defaults, not just a few
    assert settings.model == ModelSettings()
    assert settings.decoding == DecodingSettings()
    assert settings.server == ServerSettings()


def test_repo_presets_pair_real_models_of_one_family():
    presets = load_settings(env={}).presets
    assert presets["qwen2.5-7b"]["target"] == "Qwen/Qwen2.5-7B-Instruct"
    assert presets["qwen2.5-7b"]["draft"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert presets["llama-3.1-8b"]["draft"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert presets["smollm2-1.7b"]["draft"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for name, preset in presets.items():
        assert preset["target"] and preset["draft"] and preset["description"], name


def test_default_path_is_repo_root_and_specchat_config_overrides_it(settings_file):
    assert DEFAULT_SETTINGS_PATH.name == "settings.toml"
    assert (DEFAULT_SETTINGS_PATH.parent / "chatapp" / "settings.py").is_file()
    settings = load_settings(env={"SPECCHAT_CONFIG": str(settings_file)})
    assert settings.source == str(settings_file)
    assert settings.decoding.k == 5


# --- file values ------------------------------------------------------------------


def test_file_values_override_defaults_and_int_widens_to_float(write_toml):
    path = write_toml("[decoding]\ntemperature = 1\ntop_p = 0.9\n[server]\nport = 8000\nshare = true\n")
    settings = load_settings(path, env={})
    assert settings.decoding.temperature == 1.0 and isinstance(settings.decoding.temperature, float)
    assert settings.decoding.top_p == 0.9
    assert settings.server.port == 8000 and settings.server.share is True
    assert settings.decoding.k == 4  # untouched keys keep their defaults
    assert settings.presets == {}


def test_empty_file_gives_defaults(write_toml):
    settings = load_settings(write_toml(""), env={})
    assert (settings.model, settings.decoding, settings.server) == (
        ModelSettings(),
        DecodingSettings(),
        ServerSettings(),
    )


# --- validation errors name the key and the file ------------------------------------------


@pytest.mark.parametrize(
    "toml, fragments",
    [
        ("[decoding]\nfoo = 1\n", ["decoding.foo", "unknown key", "max_new_tokens"]),
        ("[model]\ntarget_dtype2 = 'auto'\n", ["model.target_dtype2", "unknown key"]),
        ("[sampler]\nk = 4\n", ["[sampler]", "unknown section", "decoding"]),
        ("k = 4\n", ["[k]", "unknown section"]),
        ("model = 'x'\n", ["model", "must be a table"]),
        ("[decoding]\nk = 'four'\n", ["decoding.k", "must be an integer"]),
        ("[decoding]\nk = true\n", ["decoding.k", "must be an integer, not a boolean"]),
        ("[decoding]\nk = 4.0\n", ["decoding.k", "must be an integer"]),
        ("[decoding]\nk = 0\n", ["decoding.k = 0", "out of range 1..16"]),
        ("[decoding]\nk = 17\n", ["decoding.k = 17", "out of range 1..16"]),
        ("[decoding]\ntemperature = -0.1\n", ["decoding.temperature = -0.1", "out of range"]),
        ("[decoding]\ntemperature = 'hot'\n", ["decoding.temperature", "must be a number"]),
        ("[decoding]\ntemperature = 1e-40\n", ["decoding.temperature = 1e-40", FLOOR_MESSAGE]),
        ("[decoding]\ntemperature = 0.009\n", ["decoding.temperature = 0.009", FLOOR_MESSAGE]),
        ("[decoding]\ntemperature = 10.5\n", ["decoding.temperature = 10.5", "out of range", "at most 10.0"]),
        ("[decoding]\ntemperature = nan\n", ["decoding.temperature = nan", FLOOR_MESSAGE]),
        ("[decoding]\ntop_p = 0\n", ["decoding.top_p = 0", "out of range (0, 1]"]),
        ("[decoding]\ntop_p = 1.5\n", ["decoding.top_p = 1.5", "out of range (0, 1]"]),
        ("[decoding]\ntop_k = -1\n", ["decoding.top_k = -1", "out of range"]),
        ("[decoding]\nmax_new_tokens = 0\n", ["decoding.max_new_tokens", "out of range 1..8192"]),
        ("[decoding]\nmode = 'turbo'\n", ["decoding.mode", '"turbo"', "speculative|standard"]),
        ("[decoding]\nauto_k = 1\n", ["decoding.auto_k", "must be a boolean"]),
        ("[decoding]\nsystem_prompt = 3\n", ["decoding.system_prompt", "must be a string"]),
        ("[decoding]\nsystem_prompt = '''line one\nline two'''\nk = 99\n", ["decoding.k = 99"]),
        ("[server]\nport = 0\n", ["server.port = 0", "out of range 1..65535"]),
        ("[server]\nport = 70000\n", ["server.port = 70000", "out of range 1..65535"]),
        ("[server]\nport = '7860'\n", ["server.port", "must be an integer"]),
        ("[server]\nopen_browser = 'no'\n", ["server.open_browser", "must be a boolean"]),
        ("[server]\nsave_conversations = 'yes'\n", ["server.save_conversations", '"yes"', "auto|on|off"]),
        ("[server]\nsave_conversations = true\n", ["server.save_conversations", "must be a string"]),
        ("[model]\ndevice = 'tpu'\n", ["model.device", "auto|cpu|cuda"]),
        ("[model]\ntarget_dtype = 'int4'\n", ["model.target_dtype", "bfloat16"]),
        ("[model]\ndraft_quantization = 'int4'\n", ["model.draft_quantization", "int8-weight-only"]),
        ("[model]\nmax_context = 63\n", ["model.max_context = 63", "out of range"]),
        ("[model]\ntarget = ''\n", ["model.target", "must not be empty"]),
        ("[model]\ntrust_remote_code = 'yes'\n", ["model.trust_remote_code", "must be a boolean"]),
        ("[presets.x]\ndraft = 'd'\n", ["presets.x.target", "missing"]),
        ("[presets.x]\ntarget = 't'\nsize = 7\n", ["presets.x.size", "unknown key"]),
        ("[presets.x]\ntarget = 5\n", ["presets.x.target", "must be a string"]),
        ("[presets]\nx = 't'\n", ["presets.x", "must be a table"]),
    ],
)
def test_file_validation_errors(write_toml, toml, fragments):
    path = write_toml(toml, name="bad_settings.toml")
    expect_error(*fragments, "bad_settings.toml", path=path)


def test_error_example_format(write_toml):
    path = write_toml("[decoding]\nk = 20\n", name="settings.toml")
    error = expect_error(path=path)
    assert str(error) == f"{path}: decoding.k = 20 is out of range 1..16"
    assert isinstance(error, ValueError)


def test_valid_range_edges_are_accepted(write_toml):
    path = write_toml(
        "[decoding]\nk = 16\ntemperature = 10\ntop_p = 1\ntop_k = 0\nmax_new_tokens = 8192\n"
        "[server]\nport = 65535\n[model]\nmax_context = 64\n"
    )
    settings = load_settings(path, env={})
    assert (settings.decoding.k, settings.decoding.temperature, settings.decoding.top_p) == (16, 10.0, 1.0)
    assert (settings.server.port, settings.model.max_context, settings.decoding.max_new_tokens) == (65535, 64, 8192)


def test_syntax_error_names_file_and_line(write_toml):
    path = write_toml("[decoding]\nk = 4\nthis is not toml\n", name="broken.toml")
    expect_error("broken.toml", "line 3", path=path)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    error = expect_error("settings file not found", "nope.toml", path=missing)
    assert str(error) == f"settings file not found: {missing}"


def test_missing_file_via_specchat_config(tmp_path):
    expect_error("not found", "elsewhere.toml", env={"SPECCHAT_CONFIG": str(tmp_path / "elsewhere.toml")})


# --- environment variables ---------------------------------------------------------------


def test_env_overrides_file(settings_file):
    env = {
        "SPECCHAT_DECODING_K": "8",
        "SPECCHAT_MODEL_TARGET": "org/Env-Model",
        "SPECCHAT_SERVER_OPEN_BROWSER": "false",
        "SPECCHAT_DECODING_TOP_P": "0.5",
        "SPECCHAT_DECODING_MAX_NEW_TOKENS": "64",
        "SPECCHAT_MODEL_DRAFT": "",
    }
    settings = load_settings(settings_file, env=env)
    assert settings.decoding.k == 8  # the file says 5
    assert settings.model.target == "org/Env-Model"  # the file says "from-file"
    assert settings.server.open_browser is False
    assert settings.decoding.top_p == 0.5
    assert settings.decoding.max_new_tokens == 64
    assert settings.decoding.temperature == 0.7  # from the file, not overridden
    assert settings.model.draft == ""


@pytest.mark.parametrize(
    "raw, expected",
    [("true", True), ("TRUE", True), ("1", True), ("Yes", True), ("false", False), ("0", False), ("NO", False)],
)
def test_env_bool_words(settings_file, raw, expected):
    settings = load_settings(settings_file, env={"SPECCHAT_DECODING_AUTO_K": raw, "SPECCHAT_SERVER_SHARE": raw})
    assert settings.decoding.auto_k is expected
    assert settings.server.share is expected


def test_os_environ_is_the_default(settings_file, monkeypatch):
    monkeypatch.setenv("SPECCHAT_DECODING_K", "7")
    assert load_settings(settings_file).decoding.k == 7


@pytest.mark.parametrize(
    "var, raw, fragments",
    [
        ("SPECCHAT_DECODING_K", "eight", ["decoding.k", "not an integer"]),
        ("SPECCHAT_DECODING_K", "4.5", ["decoding.k", "not an integer"]),
        ("SPECCHAT_DECODING_K", "0", ["decoding.k = 0", "out of range 1..16"]),
        ("SPECCHAT_DECODING_TEMPERATURE", "warm", ["decoding.temperature", "not a number"]),
        ("SPECCHAT_DECODING_TEMPERATURE", "-1", ["decoding.temperature", "out of range"]),
        ("SPECCHAT_DECODING_TEMPERATURE", "1e-40", ["decoding.temperature = 1e-40", FLOOR_MESSAGE]),
        ("SPECCHAT_SERVER_OPEN_BROWSER", "maybe", ["server.open_browser", "true/false"]),
        ("SPECCHAT_SERVER_PORT", "", ["server.port", "not an integer"]),
        ("SPECCHAT_MODEL_DEVICE", "tpu", ["model.device", "auto|cpu|cuda"]),
        ("SPECCHAT_DECODING_FOO", "1", ["decoding.foo", "unknown key"]),
        ("SPECCHAT_MODEL_NAME", "x", ["model.name", "unknown key", "target"]),
    ],
)
def test_env_errors_name_the_variable(settings_file, var, raw, fragments):
    expect_error(f"environment variable {var}", *fragments, path=settings_file, env={var: raw})


def test_unrelated_specchat_variables_are_ignored(settings_file):
    env = {"SPECCHAT_CACHE_DIR": "/tmp/x", "SPECCHAT_LOG": "debug", "SPECCHAT_PRESET": "big", "OTHER_DECODING_K": "99"}
    settings = load_settings(settings_file, env=env)
    assert settings.decoding.k == 5


# --- explicit overrides -----------------------------------------------------------------


def test_overrides_beat_env_and_file(settings_file):
    settings = load_settings(
        settings_file,
        env={"SPECCHAT_DECODING_K": "8", "SPECCHAT_MODEL_TARGET": "env-model"},
        overrides={"decoding.k": 12, "model.target": "cli-model", "server.port": 9000},
    )
    assert settings.decoding.k == 12
    assert settings.model.target == "cli-model"
    assert settings.server.port == 9000


def test_none_overrides_are_skipped(settings_file):
    settings = load_settings(
        settings_file,
        env={"SPECCHAT_DECODING_K": "8"},
        overrides={"decoding.k": None, "model.target": None, "decoding.temperature": 0},
    )
    assert settings.decoding.k == 8
    assert settings.model.target == "from-file"
    assert settings.decoding.temperature == 0.0


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"decoding.k": 17}, ["decoding.k = 17", "out of range"]),
        ({"decoding.k": True}, ["decoding.k", "not a boolean"]),
        ({"decoding.k": "8"}, ["decoding.k", "must be an integer"]),
        ({"decoding.top_p": 0.0}, ["decoding.top_p", "out of range"]),
        ({"decoding.mode": "fast"}, ["decoding.mode", "speculative|standard"]),
        ({"decoding.nope": 1}, ["decoding.nope", "unknown key"]),
        ({"sampler.k": 1}, ["sampler.k", "unknown key"]),
        ({"k": 1}, ["unknown key k", "decoding.k"]),
    ],
)
def test_override_errors_name_the_command_line(settings_file, overrides, fragments):
    expect_error("command line", *fragments, path=settings_file, overrides=overrides)


def test_with_overrides_returns_a_validated_copy(settings_file):
    settings = load_settings(settings_file, env={})
    changed = with_overrides(settings, {"decoding.temperature": 1, "decoding.top_k": 40, "decoding.seed": None})
    assert changed.decoding.temperature == 1.0 and changed.decoding.top_k == 40
    assert changed.decoding.k == 5 and changed.decoding.seed == 0
    assert settings.decoding.temperature == 0.7  # the original is untouched
    assert changed.model == settings.model and changed.presets == settings.presets
    with pytest.raises(SettingsError, match=r"^command line: decoding\.k = 0 is out of range 1\.\.16$"):
        with_overrides(settings, {"decoding.k": 0})


def test_settings_are_never_written_back(settings_file):
    before = settings_file.read_bytes()
    settings = load_settings(settings_file, env={"SPECCHAT_DECODING_K": "9"}, overrides={"decoding.seed": 3})
    with_overrides(apply_preset(settings, "big"), {"decoding.k": 2})
    assert settings_file.read_bytes() == before


def test_settings_are_frozen(settings_file):
    settings = load_settings(settings_file, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.decoding.k = 3  # type: ignore[misc]


# --- presets --------------------------------------------------------------------------------


def test_presets_load_with_optional_keys_filled(settings_file):
    presets = load_settings(settings_file, env={}).presets
    assert presets == {
        "big": {"target": "org/Big-7B", "draft": "org/Small-0.5B", "description": "big one"},
        "solo": {"target": "org/Solo-1B", "draft": "", "description": ""},
    }


def test_apply_preset_sets_target_and_draft(settings_file):
    settings = load_settings(settings_file, env={}, overrides={"model.draft": "old-draft"})
    big = apply_preset(settings, "big")
    assert (big.model.target, big.model.draft) == ("org/Big-7B", "org/Small-0.5B")
    solo = apply_preset(settings, "solo")
    assert (solo.model.target, solo.model.draft) == ("org/Solo-1B", "")
    assert big.decoding == settings.decoding and big.model.device == settings.model.device
    assert settings.model.target == "from-file"


# --- presets and the precedence of the model's target and draft ---------------------------------

FILE_WITH_PRESET = '[model]\ntarget = "file/target"\ndraft = "file/draft"\npreset = "big"\n' + PRESETS_TOML
BIG, SOLO = ("org/Big-7B", "org/Small-0.5B"), ("org/Solo-1B", "")


def pair(settings) -> tuple[str, str, str]:
    return settings.model.target, settings.model.draft, settings.model.preset


def test_a_preset_in_the_file_wins_over_the_files_target_and_draft(write_toml):
    assert pair(load_settings(write_toml(FILE_WITH_PRESET), env={})) == (*BIG, "big")
    plain = load_settings(write_toml('[model]\ntarget = "file/target"\n' + PRESETS_TOML), env={})
    assert pair(plain) == ("file/target", "", "")
    # The environment's explicit draft over the file's preset; the preset's target stays.
    assert pair(load_settings(write_toml(FILE_WITH_PRESET), env={"SPECCHAT_MODEL_DRAFT": ""})) == (BIG[0], "", "")


def test_the_environment_wins_over_the_file_and_its_preset(write_toml):
    path = write_toml(FILE_WITH_PRESET)
    # The environment's target over the file's preset; the preset's draft stays, so the pair is no longer "big".
    assert pair(load_settings(path, env={"SPECCHAT_MODEL_TARGET": "env/target"})) == ("env/target", BIG[1], "")
    assert pair(load_settings(path, env={"SPECCHAT_MODEL_PRESET": "solo"})) == (*SOLO, "solo")
    # A target or draft beside the environment's preset wins over it.
    both = {"SPECCHAT_MODEL_PRESET": "solo", "SPECCHAT_MODEL_DRAFT": "env/draft"}
    assert pair(load_settings(path, env=both)) == (SOLO[0], "env/draft", "")


def test_the_command_line_preset_wins_over_the_environment_and_its_target_and_draft_over_it(write_toml):
    path = write_toml(FILE_WITH_PRESET)
    env = {"SPECCHAT_MODEL_TARGET": "env/target", "SPECCHAT_MODEL_PRESET": "solo"}
    assert pair(load_settings(path, env=env)) == ("env/target", "", "")  # the env's explicit target over its preset
    assert pair(load_settings(path, env=env, overrides={"model.preset": "big"})) == (*BIG, "big")
    cli = {"model.preset": "big", "model.target": "cli/target"}
    assert pair(load_settings(path, env=env, overrides=cli)) == ("cli/target", BIG[1], "")
    assert pair(load_settings(path, env=env, overrides={"model.draft": "cli/draft"})) == ("env/target", "cli/draft", "")


@pytest.mark.parametrize(
    "where, kwargs",
    [
        ("settings_", dict(env={})),  # the file's own name
        ("environment variable SPECCHAT_MODEL_PRESET", dict(env={"SPECCHAT_MODEL_PRESET": "nope"})),
        ("command line", dict(env={}, overrides={"model.preset": "nope"})),
    ],
)
def test_an_unknown_preset_is_one_line_naming_where_it_was_asked_for(write_toml, where, kwargs):
    text = PRESETS_TOML if kwargs.get("env") or kwargs.get("overrides") else '[model]\npreset = "nope"\n' + PRESETS_TOML
    path = write_toml(text)
    error = expect_error("unknown preset 'nope'", "available presets: big, solo", where, path=path, **kwargs)
    assert str(error).startswith(where if where != "settings_" else str(path))


def test_the_cli_follows_the_precedence(write_toml, monkeypatch):
    """--preset used to override --target and the environment silently."""
    from chatapp.cli import _settings, build_parser

    path = str(write_toml(FILE_WITH_PRESET))
    for var in [v for v in os.environ if v.startswith("SPECCHAT_")]:
        monkeypatch.delenv(var)

    def cli(*flags):
        return pair(_settings(build_parser().parse_args(["generate", "--prompt", "hi", "--config", path, *flags])))

    assert cli() == (*BIG, "big")
    monkeypatch.setenv("SPECCHAT_MODEL_TARGET", "env/target")
    assert cli() == ("env/target", BIG[1], "")  # the environment over the file's preset
    assert cli("--preset", "solo") == (*SOLO, "solo")  # --preset over the environment
    assert cli("--preset", "solo", "--target", "cli/target") == ("cli/target", "", "")  # --target over --preset
    assert cli("--target", "cli/target", "--draft", "cli/draft") == ("cli/target", "cli/draft", "")
    monkeypatch.setenv("SPECCHAT_MODEL_PRESET", "solo")
    monkeypatch.delenv("SPECCHAT_MODEL_TARGET")
    assert cli() == (*SOLO, "solo")  # a preset chosen in the environment


def test_with_overrides_spells_out_a_preset_and_names_it_only_for_its_pair(settings_file):
    settings = load_settings(settings_file, env={})
    big = with_overrides(settings, {"model.preset": "big"})
    assert pair(big) == (*BIG, "big") and big.decoding == settings.decoding
    assert pair(with_overrides(big, {"model.draft": "other/draft"})) == (BIG[0], "other/draft", "")
    assert pair(with_overrides(big, {"model.device": "cpu"})) == (*BIG, "big")  # the pair is still the preset's
    assert pair(apply_preset(settings, "solo")) == (*SOLO, "solo")


def test_apply_unknown_preset_lists_available(settings_file):
    settings = load_settings(settings_file, env={})
    with pytest.raises(SettingsError) as info:
        apply_preset(settings, "huge")
    message = str(info.value)
    assert "\n" not in message
    assert "'huge'" in message and "big, solo" in message and settings_file.name in message


@pytest.mark.parametrize("temperature", [0, 0.01, 0.5, 10])
def test_greedy_and_temperatures_from_the_floor_up_are_accepted(temperature):
    settings = load_settings(env={}, overrides={"decoding.temperature": temperature})
    assert settings.decoding.temperature == temperature == max(temperature, 0)
    assert TEMPERATURE_FLOOR == 0.01


def test_the_reply_time_limit_comes_from_the_file_the_environment_or_the_command_line(write_toml):
    assert load_settings(env={}).limits == LimitsSettings(max_reply_seconds=300.0)
    path = write_toml("[limits]\nmax_reply_seconds = 0\n")
    assert load_settings(path, env={}).limits.max_reply_seconds == 0.0  # no limit
    env = {"SPECCHAT_LIMITS_MAX_REPLY_SECONDS": "12.5"}
    assert load_settings(path, env=env).limits.max_reply_seconds == 12.5
    assert load_settings(path, env={}, overrides={"limits.max_reply_seconds": 30}).limits.max_reply_seconds == 30.0
    for value, fragments in (
        ("-1", ["limits.max_reply_seconds = -1", "out of range 0..86400"]),
        ("'long'", ["limits.max_reply_seconds", "must be a number"]),
    ):
        expect_error(*fragments, path=write_toml(f"[limits]\nmax_reply_seconds = {value}\n"))
