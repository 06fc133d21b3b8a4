"""The decoding sidebar: one input per `DecodingSettings` field, and the one
place where the values of those inputs become a validated DecodingSettings.

Contract: `build_sidebar(decoding)`, called inside a gr.Blocks, makes the
inputs (limits from chatapp.settings) and returns them by field name in
`SIDEBAR_FIELDS` order. `decoding_settings(settings, values)` turns
{field: value} into DecodingSettings through chatapp.settings' validation (a
bad value raises SettingsError, one line naming the key).
`decoding_endpoint(...)` wraps a handler that takes one DecodingSettings into
the Gradio endpoint that receives the inputs' values one by one, and
`decoding_validator(...)` a function of the same arguments into the event's
validator (run before the request joins the queue).

Adding a sampling option: its field in DecodingSettings (and its rule), its
use in sampling, and one input in `build_sidebar`; every endpoint that takes
the sidebar then takes the option too (as an API parameter of that name).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import gradio as gr

from ..settings import (
    K_MAX,
    K_MIN,
    MAX_NEW_TOKENS_MAX,
    SEED_MAX,
    TEMPERATURE_MAX,
    DecodingSettings,
    Settings,
    SettingsError,
    with_overrides,
)

_FIELD_TYPES = typing.get_type_hints(DecodingSettings)
# The order of the endpoints' API parameters: the system prompt first, as it always was, then the
# fields in DecodingSettings' order (a new option comes last, so positional API clients keep working).
SIDEBAR_FIELDS = ("system_prompt", *(name for name in _FIELD_TYPES if name != "system_prompt"))
TOP_K_SLIDER_MAX = 200  # a slider's reach, not a limit: settings allow any top_k >= 0
SOURCE = "settings sidebar"  # how a bad value's origin is named in its error line


def build_sidebar(d: DecodingSettings) -> dict[str, gr.components.Component]:
    """The sidebar's inputs, set to `d`, by DecodingSettings field name."""
    with gr.Sidebar(label="Settings", open=True, width=330, elem_id="settings-sidebar"):
        gr.Markdown("## ⚙ Decoding")
        inputs = {
            "mode": gr.Radio(
                ["speculative", "standard"],
                value=d.mode,
                label="Mode",
                elem_id="mode",
                info="standard = the target alone, for comparison",
            ),
            "k": gr.Slider(
                K_MIN,
                K_MAX,
                value=d.k,
                step=1,
                label="K: draft tokens per round",
                elem_id="k",
                interactive=not d.auto_k,
            ),
            "auto_k": gr.Checkbox(value=d.auto_k, label="Auto K (from measured acceptance and cost)", elem_id="auto-k"),
            "temperature": gr.Slider(
                0,
                TEMPERATURE_MAX,
                value=d.temperature,
                step=0.05,
                label="Temperature (0 = greedy)",
                elem_id="temperature",
            ),
            "top_p": gr.Slider(0.01, 1.0, value=d.top_p, step=0.01, label="Top-p (1 = off)", elem_id="top-p"),
            "top_k": gr.Slider(
                0, max(TOP_K_SLIDER_MAX, d.top_k), value=d.top_k, step=1, label="Top-k (0 = off)", elem_id="top-k"
            ),
            "max_new_tokens": gr.Slider(
                1, MAX_NEW_TOKENS_MAX, value=d.max_new_tokens, step=1, label="Max new tokens", elem_id="max-new-tokens"
            ),
            "seed": gr.Number(value=d.seed, precision=0, minimum=0, maximum=SEED_MAX, label="Seed", elem_id="seed"),
            "system_prompt": gr.Textbox(
                value=d.system_prompt, lines=3, max_lines=8, label="System prompt", elem_id="system-prompt"
            ),
        }
        gr.Markdown("Applied to the next reply only; `settings.toml` is never changed.", elem_id="sidebar-note")
    missing = [name for name in SIDEBAR_FIELDS if name not in inputs]
    if missing:  # a DecodingSettings field without an input: fail at start-up, not on the first message
        raise TypeError(f"the sidebar has no input for decoding.{', decoding.'.join(missing)}")
    _keep_k_consistent(inputs)
    return {name: inputs[name] for name in SIDEBAR_FIELDS}


def _keep_k_consistent(inputs: dict[str, Any]) -> None:
    """K is set by hand only in speculative mode without auto K; auto K only in speculative mode."""

    def sync(mode: str, auto_k: bool):
        speculative = mode == "speculative"
        return gr.update(interactive=speculative and not auto_k), gr.update(interactive=speculative)

    mode, auto_k = inputs["mode"], inputs["auto_k"]
    gr.on(
        [mode.change, auto_k.change], sync, [mode, auto_k], [inputs["k"], auto_k], api_visibility="private", queue=False
    )


def _coerce(name: str, value: Any, default: Any) -> Any:
    """A widget's value as the field's type: sliders send floats, API clients may send strings;
    nothing given means the default."""
    kind = _FIELD_TYPES[name]
    if value is None or (value == "" and kind is not str):
        return default
    try:
        if kind is bool:
            return bool(value)
        if kind is int:  # exact for ints (seeds reach 2**64 - 1, past a float's precision)
            return value if type(value) is int else int(round(float(value)))
        return float(value) if kind is float else str(value)
    except (TypeError, ValueError, OverflowError):
        raise SettingsError(f"{SOURCE}: decoding.{name} = {value!r} is not a number") from None


def decoding_settings(settings: Settings, values: Mapping[str, Any]) -> DecodingSettings:
    """The sidebar's values (by field name; missing ones from `settings`) as validated
    DecodingSettings. Never written to settings.toml."""
    defaults = settings.decoding
    overrides = {f"decoding.{name}": _coerce(name, value, getattr(defaults, name)) for name, value in values.items()}
    return with_overrides(settings, overrides, source=SOURCE).decoding


Handler = Callable[..., Iterator[tuple]]


def decoding_endpoint(
    handler: Handler,
    refuse: Callable[..., tuple],
    settings: Settings,
    leading: Sequence[str],
    fields: Sequence[str] = SIDEBAR_FIELDS,
) -> Handler:
    """The Gradio endpoint for `handler(*leading_values, decoding, request)`.

    Its parameters are `leading + fields`, then the request: Gradio names an
    endpoint's API parameters after its function's, so API clients keep calling
    e.g. /chat with message=..., k=..., seed=.... It builds the one
    DecodingSettings from the `fields` values and streams the handler's
    updates; a bad value streams `refuse(error, *leading_values)` instead.
    """
    names = (*leading, *fields)

    def endpoint(*values: Any) -> Iterator[tuple]:
        given = dict(zip((*names, "request"), values))
        leading_values = [given[name] for name in leading]
        try:
            decoding = decoding_settings(settings, {name: given[name] for name in fields})
        except ValueError as error:
            yield refuse(error, *leading_values)
            return
        yield from handler(*leading_values, decoding, given.get("request"))

    return _named(endpoint, names, handler)


def decoding_validator(
    prepare: Callable[..., None],
    settings: Settings,
    leading: Sequence[str],
    fields: Sequence[str] = SIDEBAR_FIELDS,
    admission: Any = None,
) -> Callable[..., list]:
    """The validator of the event whose endpoint is `decoding_endpoint(..., leading, fields)`: it calls
    `prepare(*leading_values, decoding, request)` with the same values, and passes every input (what
    it cannot read, the handler refuses in its own words). With an `admission` (intake.Admission), a
    request past the queue's limit is refused here, as busy, on the first input."""
    names = (*leading, *fields)

    def validator(*values: Any) -> list:
        valid = [gr.validate(True, "") for _ in names]
        try:
            if admission is not None:
                admission.enter()
        except RuntimeError as busy:  # intake's BusyError
            return [gr.validate(False, str(busy)), *valid[1:]]
        try:
            given = dict(zip((*names, "request"), values))
            decoding = decoding_settings(settings, {name: given[name] for name in fields})
            prepare(*(given[name] for name in leading), decoding, given.get("request"))
        except Exception:  # a validator that raises would print the error; the handler says it in its words
            pass
        finally:
            if admission is not None:
                admission.leave()
        return valid

    return _named(validator, names, prepare)


def _named(function: Callable, names: Sequence[str], like: Callable) -> Callable:
    """`function(*values)` with the parameters `names` then the request: Gradio names an endpoint's API
    parameters after its function's, and passes the request to the parameter annotated gr.Request."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    request = inspect.Parameter("request", kind, default=None, annotation=gr.Request)
    function.__signature__ = inspect.Signature([inspect.Parameter(name, kind) for name in names] + [request])
    function.__annotations__ = {"request": gr.Request}
    function.__name__, function.__doc__ = like.__name__, like.__doc__
    return function


def without(fields: Sequence[str], *names: str) -> tuple[str, ...]:
    """`fields` less `names` (e.g. Compare runs both modes, so it takes no mode)."""
    return tuple(name for name in fields if name not in names)
