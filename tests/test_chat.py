"""chatapp.chat: prompts from chat history, and streaming detokenization.

Most tests use a tiny byte-level BPE tokenizer trained here in milliseconds
(multi-byte characters split across its tokens, as in real models); one test
uses the embedded SmolLM2 tokenizer when it is already cached.
"""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from chatapp import models as specmodels
from chatapp.chat import (
    EmptyPromptError,
    PromptResult,
    PromptTooLongError,
    StreamDecoder,
    build_prompt,
    decode,
    normalize_history,
)
from chatapp.settings import HISTORY_CHARS_MAX, HISTORY_MESSAGES_MAX

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + CHATML
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello chat! How are you today?",
    "Speculative decoding drafts tokens and the target verifies them.",
] * 10
MULTILINGUAL = "Héllo wörld! 你好，世界 🙂👍🏽 Привет — naïve café ☕ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👨‍👩‍👧 مرحبا नमस्ते"


def tiny_tokenizer(template: str | None = CHATML):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        chat_template=template,
    )


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def template_ids(tokenizer, messages):
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


# --- normalize_history ----------------------------------------------------------


def test_normalize_history_accepts_strings_and_block_lists():
    history = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look at"},
                {"type": "image", "url": "x.png"},
                {"type": "text", "text": "this"},
            ],
        },
        {"role": "assistant", "content": "A cat.", "metadata": None},
        {"role": "user", "content": {"type": "text", "text": "And now?"}},
    ]
    assert normalize_history(history) == [user("Look at\nthis"), assistant("A cat."), user("And now?")]


def test_normalize_history_drops_non_text_asides_and_merges_roles():
    history = [
        {"role": "system", "content": "ignored: the system prompt is a setting"},
        {"role": "user", "content": [{"type": "file", "path": "/tmp/a.pdf"}]},  # no text at all
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "stats: 12 tok/s", "metadata": {"title": "Speculative decoding"}},
        {"role": "assistant", "content": "Hello!"},
        SimpleNamespace(role="assistant", content=[{"type": "text", "text": "How can I help?"}], metadata=None),
        {"role": "user", "content": "Thanks"},
    ]
    assert normalize_history(history) == [user("Hi"), assistant("Hello!\n\nHow can I help?"), user("Thanks")]


def test_normalize_history_of_nothing():
    assert normalize_history([]) == []
    assert normalize_history(None) == []


# --- build_prompt -----------------------------------------------------------------


def test_build_prompt_that_fits_is_the_chat_template(tok):
    history = [user("Hello"), assistant("Hi there"), user("How are you?")]
    result = build_prompt(tok, history, "Be brief.", 1000)
    expected = template_ids(tok, [{"role": "system", "content": "Be brief."}, *history])
    assert result == PromptResult(expected, 0, None)
    assert decode(tok, result.ids).endswith("How are you?\nassistant\n")  # generation prompt added


def test_build_prompt_without_system_prompt(tok):
    for system in (None, "", "   "):
        assert build_prompt(tok, [user("Hi")], system, 100).ids == template_ids(tok, [user("Hi")])


def test_build_prompt_drops_oldest_turns_to_fit(tok):
    history = []
    for i in range(5):
        history += [user(f"question {i} " + "hello " * 10), assistant(f"answer {i} " + "world " * 10)]
    history.append(user("the latest question"))
    full = len(build_prompt(tok, history, "SYSTEM", 10_000).ids)
    keep_two = _messages_len(tok, "SYSTEM", history[6:])
    result = build_prompt(tok, history, "SYSTEM", keep_two)
    assert result.dropped_turns == 3
    assert result.notice == "3 earlier turn(s) dropped to fit the context"
    assert len(result.ids) == keep_two < full
    text = tok.decode(result.ids)
    assert "SYSTEM" in text and "the latest question" in text
    assert "question 3" in text and "question 4" in text and "question 2" not in text


def _messages_len(tokenizer, system, messages):
    return len(template_ids(tokenizer, [{"role": "system", "content": system}, *messages]))


def test_build_prompt_drops_a_turn_with_all_its_replies(tok):
    history = [user("one"), assistant("a"), assistant("b"), user("two"), assistant("c"), user("three")]
    limit = _messages_len(tok, "S", history[3:])
    result = build_prompt(tok, history, "S", limit)
    assert result.dropped_turns == 1
    assert result.ids == template_ids(tok, [{"role": "system", "content": "S"}, *history[3:]])


def test_build_prompt_keeps_latest_message_even_when_everything_else_goes(tok):
    history = [user("old " * 40), assistant("reply " * 40), user("new")]
    limit = _messages_len(tok, "S", [user("new")])
    result = build_prompt(tok, history, "S", limit)
    assert (result.dropped_turns, result.notice) == (1, "1 earlier turn(s) dropped to fit the context")


def test_build_prompt_too_long_is_one_line_with_token_counts(tok):
    needed = _messages_len(tok, "S", [user("hello " * 50)])
    with pytest.raises(PromptTooLongError) as caught:
        build_prompt(tok, [user("hi"), assistant("ho"), user("hello " * 50)], "S", needed - 1)
    message = str(caught.value)
    assert "\n" not in message and str(needed) in message and str(needed - 1) in message
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("content", ["", "   ", "\n\t"])
def test_build_prompt_rejects_empty_latest_message(tok, content):
    with pytest.raises(EmptyPromptError):
        build_prompt(tok, [user("hi"), assistant("ho"), user(content)], None, 100)
    assert issubclass(EmptyPromptError, ValueError)


def test_build_prompt_needs_a_user_message_last(tok):
    with pytest.raises(ValueError, match="end with a user message"):
        build_prompt(tok, [user("hi"), assistant("ho")], None, 100)
    with pytest.raises(ValueError):
        build_prompt(tok, [], None, 100)


def test_build_prompt_folds_system_into_first_user_message_when_template_rejects_it():
    tokenizer = tiny_tokenizer(NO_SYSTEM)
    result = build_prompt(tokenizer, [user("hi")], "Be brief.", 100)
    assert result.ids == template_ids(tokenizer, [user("Be brief.\n\nhi")])


def test_build_prompt_without_chat_template_uses_plain_roles():
    tokenizer = tiny_tokenizer(None)
    result = build_prompt(tokenizer, [user("hi"), assistant("ho"), user("how?")], "Be brief.", 100)
    assert tokenizer.decode(result.ids) == "System: Be brief.\nUser: hi\nAssistant: ho\nUser: how?\nAssistant:"


class _Returns:
    """A tokenizer whose apply_chat_template returns a given shape."""

    chat_template = "x"

    def __init__(self, value):
        self.value = value

    def apply_chat_template(self, *args, **kwargs):
        return self.value


@pytest.mark.parametrize(
    "value", [[5, 6, 7], [[5, 6, 7]], {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}, {"input_ids": [[5, 6, 7]]}]
)
def test_build_prompt_accepts_every_chat_template_return_shape(value):
    assert build_prompt(_Returns(value), [user("x")], None, 10).ids == [5, 6, 7]


class _CountingTemplate:
    """A tokenizer whose chat template counts the messages it renders, and fails past a budget
    (so a quadratic prompt builder fails fast instead of running for minutes)."""

    def __init__(self, tokenizer, budget: int):
        self.tokenizer, self.budget, self.rendered = tokenizer, budget, 0
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages, **kwargs):
        self.rendered += len(messages)
        if self.rendered > self.budget:
            raise AssertionError(f"rendered {self.rendered} messages, over the budget of {self.budget}")
        return self.tokenizer.apply_chat_template(messages, **kwargs)


def _long_history(turns: int) -> list[dict]:
    history = []
    for i in range(turns):
        history += [user(f"question {i}"), assistant(f"answer {i}")]
    return history + [user("the latest question")]


@pytest.mark.parametrize("room", [300, 10**9])  # a few turns fit / every turn fits
def test_build_prompt_of_3000_turns_renders_each_message_a_bounded_number_of_times(tok, room):
    history = _long_history(3000)
    counting = _CountingTemplate(tok, budget=3 * len(history) + 100)  # the old loop rendered ~n^2/2 messages
    started = time.perf_counter()
    result = build_prompt(counting, history, "S", room)
    assert time.perf_counter() - started < 30  # generous for a shared CPU; the old loop took minutes
    kept = history[2 * result.dropped_turns :]
    assert result.ids == template_ids(tok, [{"role": "system", "content": "S"}, *kept])
    assert len(result.ids) <= room
    if result.dropped_turns:  # the most turns that fit: one more would not
        assert 0 < result.dropped_turns < 3000
        assert _messages_len(tok, "S", history[2 * result.dropped_turns - 2 :]) > room
    else:
        assert room == 10**9


def test_build_prompt_refuses_a_huge_history_before_tokenizing(tok):
    counting = _CountingTemplate(tok, budget=0)
    started = time.perf_counter()
    with pytest.raises(ValueError) as caught:
        build_prompt(counting, _long_history(20_000), "S", 1000)
    assert time.perf_counter() - started < 5 and counting.rendered == 0
    message = str(caught.value)
    assert "\n" not in message and "40001 messages" in message and str(HISTORY_MESSAGES_MAX) in message


def test_build_prompt_refuses_too_many_characters_before_tokenizing(tok):
    counting = _CountingTemplate(tok, budget=0)
    history = [user("x" * (HISTORY_CHARS_MAX // 2)), assistant("y" * (HISTORY_CHARS_MAX // 2)), user("z")]
    with pytest.raises(ValueError, match=f"{HISTORY_CHARS_MAX + 1} characters") as caught:
        build_prompt(counting, history, None, 1000)
    assert counting.rendered == 0 and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "history, system, field",
    [
        ([user("a \ud800 b")], None, "the message"),
        ([user("hi"), assistant("x\udfffy"), user("ok")], None, "message 2 of the chat history"),
        ([user("hi")], "be \ud800 brief", "the system prompt"),
    ],
)
def test_build_prompt_names_the_field_with_a_lone_surrogate(tok, history, system, field):
    with pytest.raises(ValueError) as caught:
        build_prompt(tok, history, system, 1000)
    message = str(caught.value)
    assert message.startswith(f"{field} contains characters that cannot be encoded (lone surrogate U+D")
    assert "TextEncodeInput" not in message and "\n" not in message


def test_build_prompt_blames_a_too_long_system_prompt(tok):
    system = "hello " * 200
    limit = _messages_len(tok, system, [user("hi")]) - 10
    with pytest.raises(PromptTooLongError) as caught:
        build_prompt(tok, [user("hi")], system, limit)
    message = str(caught.value)
    assert message.startswith("the system prompt is too long") and str(limit) in message and "\n" not in message


# --- decode and StreamDecoder ------------------------------------------------------------


def test_decode_skips_special_tokens(tok):
    ids = tok.encode("<|im_start|>Hello<|im_end|>", add_special_tokens=False)
    assert decode(tok, ids) == "Hello"


def _stream(tokenizer, ids, chunks):
    decoder = StreamDecoder(tokenizer)
    deltas, i = [], 0
    for size in chunks:
        deltas.append(decoder.push(ids[i : i + size]))
        i += size
    deltas.append(decoder.push(ids[i:]))
    deltas.append(decoder.flush())
    return decoder, deltas


def test_stream_decoder_token_by_token_equals_full_decode(tok):
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # characters really are split across tokens
    decoder, deltas = _stream(tok, ids, [1] * len(ids))
    assert "".join(deltas) == decode(tok, ids) == MULTILINGUAL
    assert decoder.text == MULTILINGUAL
    assert not any("\ufffd" in delta for delta in deltas)


def test_stream_decoder_in_random_chunks_with_special_tokens(tok):
    ids = tok.encode("Hello<|im_end|> " + MULTILINGUAL + " The quick fox.<|im_end|>", add_special_tokens=False)
    rng = random.Random(0)
    for _ in range(5):
        chunks = [rng.randint(0, 4) for _ in range(len(ids) // 2)]
        _, deltas = _stream(tok, ids, chunks)
        assert "".join(deltas) == decode(tok, ids)


def test_stream_decoder_holds_back_split_characters_until_complete(tok):
    ids = tok.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    decoder = StreamDecoder(tok)
    assert [decoder.push([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1:]) == "🙂"


def test_stream_decoder_flush_returns_a_cut_character(tok):
    ok, smile = tok.encode("ok ", add_special_tokens=False), tok.encode("🙂", add_special_tokens=False)
    decoder = StreamDecoder(tok)
    assert decoder.push(ok) == "ok "
    assert decoder.push(smile[:-1]) == ""  # held back: an incomplete character
    assert decoder.flush() == decode(tok, smile[:-1]) != ""
    assert decoder.flush() == ""


class _CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_stream_decoder_decodes_a_short_window_not_the_whole_reply(tok):
    ids = tok.encode(("The quick brown fox. " + MULTILINGUAL + " ") * 8, add_special_tokens=False)
    counting = _CountingTokenizer(tok)
    _, deltas = _stream(counting, ids, [1] * len(ids))
    assert "".join(deltas) == decode(tok, ids)
    assert len(ids) > 200 and max(counting.lengths) <= 12


@pytest.mark.slow
def test_with_the_embedded_tokenizer_when_cached():
    folder = specmodels.cache_dir() / "models" / "smollm2-135m-instruct"
    if not (folder / ".specchat-complete").is_file():
        pytest.skip("the embedded model is not converted yet (tests/test_models.py does it)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    _, deltas = _stream(tokenizer, ids, [1] * len(ids))
    assert "".join(deltas) == MULTILINGUAL
    history = [user("hello " * 30), assistant("hi " * 30), user("What is 2+2?")]
    limit = len(build_prompt(tokenizer, history[2:], "Be brief.", 10_000).ids)
    result = build_prompt(tokenizer, history, "Be brief.", limit)
    assert result.dropped_turns == 1 and "What is 2+2?" in decode(tokenizer, result.ids)
