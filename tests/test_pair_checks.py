"""A loaded pair's vocabulary sizes against its tokenizer (issue 11, defect 4), and a draft that cannot be
loaded (load_pair(draft_fallback=True): standard decoding only).

A model whose embedding has fewer rows than the ids its tokenizer produces passed the tokenizer
check and crashed later with an IndexError (in calibration, or at the first prompt with a high id).
load_pair now compares each model's vocabulary size with the tokenizer and refuses the pair with a
one-line IncompatibleModelsError. Tiny Llama folders as in tests/test_models.py.
"""

from __future__ import annotations

import pytest
import torch

from chatapp import cli
from chatapp.models import (
    IncompatibleModelsError,
    ModelLoadError,
    check_vocab_sizes,
    load_pair,
    loading,
    tokenizer_span,
)
from chatapp.service import ChatService
from chatapp.settings import DecodingSettings
from tests.test_models import model_settings, save_folder, tiny_llama, tok  # noqa: F401  (tok: a fixture)

SHORT = 60  # embedding rows the short models lack


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):  # noqa: F811
    root = tmp_path_factory.mktemp("pairs")
    return {
        "full": save_folder(root / "full", tiny_llama(len(tok)), tok),
        "short": save_folder(root / "short", tiny_llama(len(tok) - SHORT, seed=1), tok),
        "padded": save_folder(root / "padded", tiny_llama(len(tok) + 64, seed=2), tok),
    }


def load(target, draft=""):
    return load_pair(model_settings(target=str(target), draft=str(draft), device="cpu"), lambda message: None)


def test_the_tokenizer_span_is_one_past_its_highest_id(tok):  # noqa: F811
    assert tokenizer_span(tok) == len(tok) == max(tok.get_vocab().values()) + 1


@pytest.mark.parametrize(
    "target, draft, role",
    [("full", "short", "draft"), ("short", "full", "target"), ("short", "", "target"), ("short", "short", "target")],
)
def test_a_model_smaller_than_the_tokenizer_is_refused_at_load(folders, tok, target, draft, role):  # noqa: F811
    with pytest.raises(IncompatibleModelsError) as caught:
        load(folders[target], folders[draft] if draft else "")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"the {role} '")
    assert f"{len(tok) - SHORT} token embeddings" in message and f"ids up to {len(tok) - 1}" in message


def test_a_padded_vocabulary_is_fine_and_the_pair_generates(folders, tok):  # noqa: F811
    pair = load(folders["full"], folders["padded"])
    assert (pair.target.vocab_size, pair.draft.vocab_size) == (len(tok), len(tok) + 64)
    service = ChatService(pair)
    service.calibrate(new_tokens=4)
    history = [{"role": "user", "content": "Hello <|im_start|> fox"}]  # a special token: a high id
    turn = service.start_turn(history, DecodingSettings(max_new_tokens=6))
    list(turn)
    assert turn.tokens and all(t.id < len(tok) for t in turn.tokens)


def test_check_vocab_sizes_names_both_sizes(tok):  # noqa: F811
    check_vocab_sizes(tok, len(tok), len(tok) + 5, "t", "d")
    with pytest.raises(IncompatibleModelsError, match=r"^the draft 'd' has 10 token embeddings.*target 't' has 300"):
        check_vocab_sizes(tok, len(tok), 10, "t", "d")


def test_the_command_line_says_it_in_one_line(folders, capsys):
    argv = [
        "generate",
        "--prompt",
        "hi",
        "--target",
        str(folders["full"]),
        "--draft",
        str(folders["short"]),
        "--device",
        "cpu",
    ]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the draft '") and "token embeddings" in err[-1]


# --- a draft that cannot be loaded: standard decoding only, when the caller asks for it -------------------


@pytest.mark.parametrize("draft", ["missing", "short"])
def test_a_draft_that_cannot_load_is_an_error_unless_the_caller_falls_back(folders, tmp_path, draft):
    spec = str(tmp_path / "no-such-model") if draft == "missing" else str(folders["short"])
    settings = model_settings(target=str(folders["full"]), draft=spec, device="cpu")
    with pytest.raises(ModelLoadError):
        load_pair(settings, lambda message: None)
    said: list[str] = []
    pair = load_pair(settings, said.append, draft_fallback=True)
    assert pair.draft is None and pair.draft_error.startswith("the draft could not be loaded: ")
    assert "\n" not in pair.draft_error and spec in pair.draft_error
    assert pair.compatibility == f"no draft: {pair.draft_error}"
    assert any(line.startswith("warning: the draft could not be loaded") for line in said)


def test_a_draft_that_fails_while_building_falls_back(folders, monkeypatch):
    def broken(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(loading, "_build_draft", broken)
    settings = model_settings(target=str(folders["full"]), device="cpu")
    with pytest.raises(torch.OutOfMemoryError):
        load_pair(settings, lambda message: None)
    pair = load_pair(settings, lambda message: None, draft_fallback=True)
    assert pair.draft is None and "CUDA out of memory" in pair.draft_error


def test_the_target_never_falls_back(folders):
    settings = model_settings(target=str(folders["short"]), draft=str(folders["full"]), device="cpu")
    with pytest.raises(IncompatibleModelsError, match="^the target '"):
        load_pair(settings, lambda message: None, draft_fallback=True)


def test_the_service_runs_standard_decoding_without_a_draft_and_says_why(folders, tmp_path):
    spec = str(tmp_path / "no-such-model")
    pair = load_pair(
        model_settings(target=str(folders["full"]), draft=spec, device="cpu"), lambda message: None, draft_fallback=True
    )
    service = ChatService(pair)
    assert service.context == pair.target.max_positions and service.standard_only.startswith(
        "standard decoding only: the draft could not be loaded: "
    )
    assert service.calibrate(new_tokens=4) is not None
    history = [{"role": "user", "content": "the quick brown fox"}]
    turn = service.start_turn(history, DecodingSettings(max_new_tokens=8, auto_k=True))
    list(turn)
    assert turn.stats.mode == "standard" and turn.k_choice is None and turn.notice == service.standard_only
    standard = service.start_turn(history, DecodingSettings(max_new_tokens=8, mode="standard"), fresh=True)
    list(standard)
    assert standard.notice is None and [t.id for t in standard.tokens] == [t.id for t in turn.tokens]
