"""Tests for the bench's variant section (chatapp.bench.variants): every CPU kernel variant end to end.

A tiny random Llama runs through the section on the AVX2 variant (built with
-mno-avx512f on an AVX-512 machine; cached after the first build) and torch
ops; synthetic sections check the rows, the goals (with negative controls)
and the table exactly. No timed assertions: the figures are only checked to
exist and to be read against the thresholds the right way round.
"""

import json

import pytest
import torch

from chatapp import bench as B
from chatapp.bench import variants as V
from chatapp.cli import build_parser
from chatapp.kernels import TORCH, supported_variants
from chatapp.llama import LlamaDecoderLM
from chatapp.settings import load_settings
from tests.conftest import tiny_llama

K = 3
NEW_TOKENS = 8

# --- the section on a tiny model, end to end ----------------------------------------------------


def tiny_models(hf) -> B.Models:
    plain = LlamaDecoderLM(hf, variant=TORCH)
    return B.Models(target=plain, draft=plain, stop_ids=(), hf_target=hf, pad_id=0)


@pytest.fixture(scope="module")
def section():
    hf = tiny_llama(vocab=96, max_positions=128)  # spread-out logits: greedy has no near-ties
    prompts = [B.BenchPrompt(f"p{i}", "cat", tuple(range(3 + i, 15 + i))) for i in range(2)]
    options = B.Options(micro_reps=2, bandwidth_mb=8, variant_max_new_tokens=NEW_TOKENS, warmup_tokens=4)
    wanted = [v for v in ("avx2",) if v in supported_variants()]
    raw = B.run_variants(tiny_models(hf), prompts, options, progress=lambda message: None, k=K, variants=wanted)
    return B.finish_variants(raw)


def test_every_variant_runs_interleaved_with_one_shared_baseline(section):
    expected = [v for v in ("avx2",) if v in section["asked"] and v not in section["not_built"]] + [TORCH]
    assert section["variants"] == expected and section["k"] == K and section["max_new_tokens"] == NEW_TOKENS
    slots = ["hf-generate T=0"] + [f"{mode} T=0 [{v}]" for v in expected for mode in ("standard", f"speculative K={K}")]

    def label(r):
        return r["config"] + (f" [{r['variant']}]" if "variant" in r else "")

    runs = section["runs"]
    assert len(runs) == 2 * len(slots)
    # per prompt every slot once, the order rotated per prompt; hf-generate once per prompt, untagged
    assert [label(r) for r in runs[: len(slots)]] == slots
    assert [label(r) for r in runs[len(slots) :]] == slots[1:] + slots[:1]
    assert [r["prompt_id"] for r in runs] == ["p0"] * len(slots) + ["p1"] * len(slots)
    for r in runs:
        assert r["new_tokens"] == NEW_TOKENS and r["tokens_per_s"] > 0 and r["temperature"] == 0
        assert (r["mode"] == "hf-generate") == ("variant" not in r)
        if r["mode"] == "speculative":
            assert r["k"] == K and r["decoding"] == "speculative" and r["drafted"] > 0


def test_rows_hold_every_figure_and_greedy_equality(section):
    assert list(section["rows"]) == section["variants"]
    hf = {row["hf_generate_tokens_per_s"] for row in section["rows"].values()}
    assert len(hf) == 1 and hf.pop() > 0  # one baseline, shared
    for name, row in section["rows"].items():
        assert row["greedy_equal"] == {"same": 2, "runs": 2, "equal": True}, name
        for key in ("standard_vs_hf", "speculative_vs_hf", "speculative_vs_standard", "target_step_vs_bound"):
            assert row[key] > 0, (name, key)
        assert 0 <= row["acceptance"] <= 1 and row["verify_vs_step"] > 0 and row["prefill_s"] > 0
        assert row["prefill_vs_avx512"] is None  # no avx512 in this section
    micro = section["micro"]
    assert set(micro["rows"]) == set(section["variants"])
    assert micro["verify_tokens"] == V.VERIFY_TOKENS and micro["prefill_tokens"] == V.PREFILL_TOKENS


def test_table_report_and_goals_render(section, tmp_path):
    table = B.variants_table(section)
    assert f"speculative K={K} tok/s (× standard)" in table and "| torch (torch ops) |" in table
    assert "yes (2/2)" in table and "hf-generate (transformers generate(), the shared baseline)" in table
    statuses = {g["title"].split(":")[0]: g["status"] for g in section["goals"]}
    assert set(statuses) == {"avx2", "avx512", V.EVERY_VARIANT}
    assert statuses["avx512"] == "NOT MEASURED"  # not run here: every check says so, none fails
    every = next(g for g in section["goals"] if g["title"].startswith(V.EVERY_VARIANT))
    assert len(every["checks"]) == 2 * len(section["variants"])
    files = B.write_variant_outputs(section, tmp_path)
    data = json.loads(files["results"].read_text())
    assert data["variants"]["rows"].keys() == section["rows"].keys()
    report = files["report"].read_text()
    assert "## CPU kernel variants" in report and "### Variant goals" in report and "verify 9 / step" in report


def test_alone_it_joins_a_full_run_already_in_the_folder(section, tmp_path):
    hf = tiny_llama(vocab=96, max_positions=128)
    target, draft = LlamaDecoderLM(hf, variant=TORCH), LlamaDecoderLM(hf, quantize="int8-weight-only", variant=TORCH)
    models = B.Models(target=target, draft=draft, stop_ids=(), hf_target=hf, pad_id=0)
    prompts = [B.BenchPrompt("p0", "cat", tuple(range(3, 15)))]
    options = B.Options(
        max_new_tokens=4,
        ks=(2,),
        temperatures=(0.0,),
        modes=("hf-generate", "standard", "speculative"),
        warmup_tokens=2,
        micro_reps=1,
        bandwidth_mb=8,
    )
    result = B.finish(B.bench(models, prompts, options, progress=lambda message: None))
    B.write_outputs(result, tmp_path, progress=lambda message: None)
    B.write_variant_outputs(section, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["runs"] == json.loads(json.dumps(result["runs"])) and data["variants"]["k"] == K
    report = (tmp_path / "report.md").read_text()
    assert "## Headline" in report and "## CPU kernel variants" in report and "tokens_per_s.png" in report


def test_a_section_that_cannot_run_says_why():
    hf = tiny_llama(vocab=32, max_positions=16).to(torch.bfloat16)
    prompts = [B.BenchPrompt("p0", "cat", (3, 4, 5))]
    models = B.Models(target=None, draft=None, hf_target=hf)
    section = B.finish_variants(B.run_variants(models, prompts, B.Options(), progress=lambda message: None))
    assert section == {"skipped": "the target's weights are bfloat16; the kernels take float32"}
    assert B.variants_table(section).startswith("Variant section not run: the target's weights are bfloat16")
    assert "no transformers model" in V.unsupported_reason(B.Models(target=None, draft=None))


# --- rows and goals on synthetic sections ---------------------------------------------------------


def record(mode, tps, prompt, *, variant=None, tokens=(1, 2, 3, 4)):
    """A run record as runs.run_slot makes them (the fields the section reads)."""
    k = 6 if mode == "speculative" else 0
    r = {
        "config": B.Config(mode, k, 0.0).label,
        "mode": mode,
        "k": k,
        "temperature": 0.0,
        "prompt_id": prompt,
        "new_tokens": 64,
        "wall_s": 64 / tps,
        "tokens_per_s": tps,
        "token_ids": list(tokens),
        "drafted": 60 if k else 0,
        "accepted": 54 if k else 0,
        "rounds": 10 if k else 0,
        "rejected": 6 if k else None,
    }
    if variant:
        r["variant"] = variant
    return r


# tokens/s (standard, speculative) and micro seconds (target step, draft step, verify, prefill): every goal passes
GOOD = {
    "avx512": ((30.0, 70.0), (0.011, 0.0035, 0.012, 0.10)),
    "avx2": ((28.0, 50.0), (0.012, 0.0038, 0.016, 0.15)),
    "torch": ((12.0, 15.0), (0.030, 0.020, 0.040, 0.30)),
}


def fake_section(speeds=GOOD, *, differing=()) -> dict:
    """A raw section over prompts p0..p2 (hf-generate 10 tok/s); speculative tokens differ for `differing` variants
    on p1."""
    runs = []
    for prompt in ("p0", "p1", "p2"):
        runs.append(record("hf-generate", 10.0, prompt))
        for name, ((std, spec), _) in speeds.items():
            tokens = (1, 2, 9, 9) if name in differing and prompt == "p1" else (1, 2, 3, 4)
            runs += [
                record("standard", std, prompt, variant=name),
                record("speculative", spec, prompt, variant=name, tokens=tokens),
            ]
    rows = {
        name: dict(zip(("target_step_s", "draft_step_s", "verify_s", "prefill_s"), costs), isa=name, implementation="")
        for name, (_, costs) in speeds.items()
    }
    micro = {
        "rows": rows,
        "target_bound_s": 0.010,
        "draft_bound_s": 0.003,
        "verify_tokens": 9,
        "prefill_tokens": 100,
        "reps": 3,
        "bandwidth_gb_s": 10.0,
        "context": 100,
        "threads": 2,
    }
    prompts = [{"id": p, "category": "c", "prompt_tokens": 20} for p in ("p0", "p1", "p2")]
    return {"k": 6, "variants": list(speeds), "runs": runs, "micro": micro, "prompts": prompts, "max_new_tokens": 64}


def test_rows_are_the_medians_and_ratios_exactly():
    rows = V.variant_rows(fake_section())
    avx2 = rows["avx2"]
    assert avx2["standard_tokens_per_s"] == 28.0 and avx2["hf_generate_tokens_per_s"] == 10.0
    assert avx2["standard_vs_hf"] == pytest.approx(2.8) and avx2["speculative_vs_standard"] == pytest.approx(50 / 28)
    assert avx2["speculative_vs_standard_paired"] == pytest.approx(50 / 28)
    assert avx2["acceptance"] == pytest.approx(54 / 60)  # accepted / (accepted + rounds with a rejection)
    assert avx2["target_step_vs_bound"] == pytest.approx(1.2) and avx2["draft_step_vs_bound"] == pytest.approx(
        0.0038 / 0.003
    )
    assert avx2["verify_vs_step"] == pytest.approx(0.016 / 0.012) and avx2["prefill_vs_avx512"] == pytest.approx(1.5)
    assert avx2["greedy_equal"] == {"same": 3, "runs": 3, "equal": True}


def test_goals_pass_on_good_figures():
    section = B.finish_variants(fake_section())
    assert [g["status"] for g in section["goals"]] == ["PASS", "PASS", "PASS"], section["goals"]
    assert all(not g["explanation"] for g in section["goals"])
    assert "| avx2 (avx2) | 28.0 (2.80×) | 50.0 (1.79×) | 0.90 | yes (3/3) | 1.20× |" in B.variants_table(section)


def test_goals_fail_with_the_numbers_behind_them():
    slow = dict(GOOD)
    slow["avx2"] = ((20.0, 50.0), GOOD["avx2"][1])  # standard only 2.0x hf-generate (needs 2.5x)
    slow["avx512"] = ((30.0, 70.0), (0.011, 0.0050, 0.020, 0.10))  # draft 1.67x its bound, verify 1.82x a step
    slow["torch"] = ((9.0, 8.0), GOOD["torch"][1])  # both modes slower than generate()
    section = B.finish_variants(fake_section(slow, differing=("torch",)))
    avx2, avx512, every = section["goals"]
    assert [avx2["status"], avx512["status"], every["status"]] == ["FAIL", "FAIL", "FAIL"]
    failed = [c["name"] for g in section["goals"] for c in g["checks"] if c["ok"] is False]
    assert failed == [
        "avx2: standard tokens/s / hf-generate's",
        "avx512: draft step / its weight-reading bound",
        "avx512: verify of 9 tokens / 1-token step",
        "torch: standard tokens/s / hf-generate's",
        "torch: speculative tokens/s / hf-generate's",
    ]
    assert avx2["explanation"] == [
        "avx2: standard 20.0 tok/s, speculative 50.0 tok/s (acceptance a=0.90), hf-generate 10.0 tok/s."
    ]
    assert avx512["explanation"][0] == "avx512: draft step 5.00 ms vs its bound 3.00 ms."
    assert every["explanation"] == [  # two failed checks, one sentence with the numbers behind both
        "torch: standard 9.0 tok/s, speculative 8.0 tok/s (acceptance a=0.90), hf-generate 10.0 tok/s."
    ]
    # greedy inequality is reported, not hidden
    assert section["rows"]["torch"]["greedy_equal"] == {"same": 2, "runs": 3, "equal": False}
    assert "| NO (2/3) |" in B.variants_table(section)


def test_a_variant_this_cpu_lacks_is_not_measured():
    only = {name: GOOD[name] for name in ("avx2", "torch")}
    avx2, avx512, every = B.finish_variants(fake_section(only))["goals"]
    assert avx512["status"] == "NOT MEASURED"
    assert all(c["value"] is None for c in avx512["checks"])
    assert avx2["status"] == "INCOMPLETE"  # all measured checks pass; the prefill vs avx512's is not measured
    assert [c["ok"] for c in avx2["checks"]] == [True, True, True, None]
    assert every["status"] == "PASS" and len(every["checks"]) == 4


def test_goals_read_the_threshold_table():
    stricter = {**V.VARIANT_GOALS, "avx2": {**V.VARIANT_GOALS["avx2"], "standard_vs_hf": 3.0}}
    goal = B.finish_variants(fake_section(), stricter)["goals"][0]
    assert goal["status"] == "FAIL" and goal["checks"][0]["threshold"] == 3.0 and ">= 3" in goal["title"]


# --- flags ------------------------------------------------------------------------------------------


def options(*flags):
    return B.resolve_options(load_settings(), build_parser().parse_args(["bench", *flags]))


def test_flags_choose_the_section_and_size_it():
    full = options()
    assert full.variants and not full.variants_only and full.variant_k is None
    assert (full.variant_prompt_limit, full.variant_max_new_tokens) == (6, 64)
    assert not options("--no-variants").variants
    assert not options("--quick").variants  # the quick budget has no room for it
    alone = options("--variants", "--quick")
    assert alone.variants and alone.variants_only and alone.variant_prompt_limit == B.QUICK["variant_prompt_limit"]
    sized = options("--variants", "--prompt-limit", "3", "--max-new-tokens", "20", "--variant-k", "4")
    assert (sized.variant_prompt_limit, sized.variant_max_new_tokens, sized.variant_k) == (3, 20, 4)
    assert sized.prompt_limit == 3 and sized.max_new_tokens == 20


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--variants", "--no-variants"), "choose one"),
        (("--variant-k", "0"), "--variant-k must be in 1..16"),
        (("--prompt-limit", "0"), "--prompt-limit must be >= 1"),
    ],
)
def test_bad_variant_flags_say_which(flags, message):
    with pytest.raises(ValueError, match=message):
        options(*flags)
