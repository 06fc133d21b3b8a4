"""A loaded pair's vocabulary sizes against its tokenizer (issue 11, defect 4).

A model whose embedding has fewer rows than the ids its tokenizer produces passed the tokenizer
check and crashed later with an IndexError (in calibration, or at the first prompt with a high id).
load_pair now compares each model's vocabulary size with the tokenizer and refuses the pair with a
one-line IncompatibleModelsError. Tiny Llama folders as in tests/test_models.py.
"""

from __future__ import annotations

import pytest

from chatapp import cli
from chatapp.models import IncompatibleModelsError, check_vocab_sizes, load_pair, tokenizer_span
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
    argv = ["generate", "--prompt", "hi", "--target", str(folders["full"]), "--draft", str(folders["short"]),
            "--device", "cpu"]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the draft '") and "token embeddings" in err[-1]
