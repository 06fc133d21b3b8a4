"""The Model tab's picker: the target and draft a user asks for, as [model] settings.

Contract: plain functions of settings, no Gradio. `picker_fields(model,
presets)` gives the picker's values for a ModelSettings (what serves now);
`preset_fields` the values a [presets.NAME] pair sets; `chosen_model` turns
the picker's values into validated ModelSettings, starting from the serving
pair's (device, dtype and context stay), or raises SettingsError with one
line naming the field. `can_switch(server)` says whether the page may switch
models at all: only on a server that this machine alone can reach
(a loopback host and no share link), since a switch changes the pair for
every user of the server and loads whatever path or hub id is typed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from ..settings import ModelSettings, ServerSettings, Settings, SettingsError, with_overrides

DRAFT_COPY = "the target's INT8 copy"
DRAFT_OTHER = "another model (same tokenizer)"
DRAFT_KINDS = (DRAFT_COPY, DRAFT_OTHER)
QUANTIZATIONS = ("auto", "int8-weight-only", "bnb-int8", "none")  # model.draft_quantization's values
CUSTOM = "(custom)"  # the preset menu's first entry: the target and draft as typed (no preset has parentheses)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SOURCE = "Model tab"  # how a bad value's origin is named in its error line


@dataclass(frozen=True)
class PickerFields:
    """The picker's values, one per input."""

    preset: str
    target: str
    draft_kind: str
    draft: str
    quantization: str


def preset_choices(presets: Mapping[str, Mapping[str, str]]) -> list[tuple[str, str]]:
    """The preset menu: (label, value) pairs, the custom entry first."""
    return [("custom: the target and draft below", CUSTOM)] + [
        (f"{name}: {preset['description']}" if preset.get("description") else name, name)
        for name, preset in presets.items()
    ]


def matching_preset(model: ModelSettings, presets: Mapping[str, Mapping[str, str]]) -> str:
    """The preset whose pair `model` is, or CUSTOM."""
    for name, preset in presets.items():
        if preset["target"] == model.target and (preset.get("draft") or "") == model.draft:
            return name
    return CUSTOM


def picker_fields(model: ModelSettings, presets: Mapping[str, Mapping[str, str]]) -> PickerFields:
    other = bool(model.draft.strip())
    return PickerFields(
        preset=matching_preset(model, presets),
        target=model.target,
        draft_kind=DRAFT_OTHER if other else DRAFT_COPY,
        draft=model.draft,
        quantization=model.draft_quantization,
    )


def preset_fields(model: ModelSettings, presets: Mapping[str, Mapping[str, str]], name: str) -> PickerFields | None:
    """The picker's values once preset `name` is chosen (None for CUSTOM or an unknown name: nothing changes)."""
    preset = presets.get(name)
    if preset is None:
        return None
    return picker_fields(dataclasses.replace(model, target=preset["target"], draft=preset.get("draft") or ""), presets)


def chosen_model(
    settings: Settings,
    serving: ModelSettings,
    target: str | None,
    draft_kind: str | None,
    draft: str | None,
    quantization: str | None,
) -> ModelSettings:
    """The [model] settings the picker asks for: `serving` with the target, draft and draft quantization
    replaced, validated as the settings file's values are."""
    if draft_kind not in DRAFT_KINDS:
        raise SettingsError(f"{SOURCE}: the draft must be {DRAFT_COPY!r} or {DRAFT_OTHER!r}")
    other = draft_kind == DRAFT_OTHER
    draft = (draft or "").strip() if other else ""
    if other and not draft:
        raise SettingsError(
            f"{SOURCE}: name the draft model (a hub id, a folder or a .gguf file), or choose {DRAFT_COPY!r}"
        )
    overrides = {
        "model.target": (target or "").strip(),
        "model.draft": draft,
        "model.draft_quantization": quantization or "auto",
    }
    return with_overrides(dataclasses.replace(settings, model=serving), overrides, source=SOURCE).model


def can_switch(server: ServerSettings) -> bool:
    """Whether the page may switch the model pair: only on a server for this machine alone."""
    return server.host in LOOPBACK_HOSTS and not server.share
