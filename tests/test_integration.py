"""End-to-end checks on the real embedded pair (SmolLM2-135M-Instruct, fp32
target, int8 weight-only draft). The model is fetched and converted by
`python main.py prepare`, which `make test` runs first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatapp.chat import build_prompt, decode
from chatapp.engine import Generation
from chatapp.models import load_pair, stop_token_ids
from chatapp.sampling import SamplingParams
from chatapp.settings import load_settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that checks whether a number is prime.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for writing clear emails.",
    "Summarize: The Industrial Revolution began in Britain in the late 18th century and spread to Europe and "
    "North America, transforming economies from agrarian to industrial.",
]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def pair():
    return load_pair(load_settings().model, progress=lambda message: None)


def prompt_ids(pair, text):
    return build_prompt(pair.tokenizer, [{"role": "user", "content": text}], "You are a helpful assistant.", 1024).ids


def run(pair, ids, **kwargs):
    generation = Generation(
        pair.target, pair.draft, ids, max_new_tokens=NEW_TOKENS, stop_ids=stop_token_ids(pair.tokenizer), **kwargs
    )
    generation.run()
    return generation


def test_embedded_pair_is_fp32_target_and_int8_draft(pair):
    assert pair.target.info.dtype == "float32"
    assert "int8" in pair.draft.info.quantization
    assert pair.target.vocab_size == pair.draft.vocab_size == len(pair.tokenizer)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_greedy_speculative_equals_greedy_standard(pair, k, record_property):
    drafted = accepted = 0
    for text in PROMPTS:
        ids = prompt_ids(pair, text)
        standard = run(pair, ids, mode="standard")
        speculative = run(pair, ids, mode="speculative", k=k)
        assert speculative.token_ids == standard.token_ids, text
        assert decode(pair.tokenizer, standard.token_ids).strip()
        drafted += speculative.stats.drafted
        accepted += speculative.stats.accepted
    rate = accepted / drafted
    record_property(f"int8_draft_acceptance_T0_k{k}", rate)
    print(f"\nINT8 draft acceptance at T=0, K={k}: {rate:.3f} ({accepted}/{drafted})")
    # A weight-only int8 copy agrees with its target far more often than chance.
    assert rate > 0.8


def test_sampling_is_seeded_and_mixes_sources(pair):
    ids = prompt_ids(pair, PROMPTS[3])
    params = SamplingParams(temperature=0.7, top_p=0.9)
    first = run(pair, ids, mode="speculative", k=4, sampling=params, seed=11)
    again = run(pair, ids, mode="speculative", k=4, sampling=params, seed=11)
    assert first.token_ids == again.token_ids
    assert {t.source for t in first.tokens} <= {"draft", "target", "bonus"}
    assert first.stats.accepted > 0


def test_cli_generate_json(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [
            sys.executable,
            "main.py",
            "generate",
            "--prompt",
            "Name a primary color.",
            "--max-new-tokens",
            "12",
            "--k",
            "3",
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) == len(out["sources"]) == out["stats"]["new_tokens"] > 0
    assert out["stats"]["mode"] == "speculative" and out["stats"]["k"] == 3
    assert out["stats"]["speedup"] is not None and out["stats"]["baseline_source"].startswith("median of")
    assert out["text"].strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "   "], "the prompt is empty"),
        (["--prompt", "hi", "--k", "0"], "decoding.k"),
        (["--prompt", "hi", "--temperature", "-1"], "decoding.temperature"),
        (["--prompt", "hi", "--top-p", "1.5"], "decoding.top_p"),
        (["--prompt", "hi", "--target", "/no/such/model"], "no/such/model"),
        (["--prompt", "hi", "--k", "four"], "invalid int value"),
        (["--prompt", "word " * 3000], "token"),
    ],
)
def test_cli_bad_input_is_one_line(args, message):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "main.py", "generate", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-2000:]
    assert message in errors[0]
    assert "Traceback" not in result.stderr
