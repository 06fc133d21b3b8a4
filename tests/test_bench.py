"""Tests for the chatapp.bench package: options, prompts, summaries, theory, goals, and a tiny end-to-end run.

Everything runs on tiny random Llama models built here; no network, no real model.
"""

import copy
import json
from pathlib import Path

import pytest
import torch

from chatapp import bench as B
from chatapp.autok import AcceptanceTracker, KChoice
from chatapp.bench import HF_MODES, goals, runs
from chatapp.cli import build_parser
from chatapp.settings import load_settings

# --- helpers ----------------------------------------------------------------------


def run(mode, tps, *, k=0, t=0.0, prompt="p0", drafted=0, accepted=0, rounds=0, new_tokens=10, **extra):
    """A synthetic run record as bench.run_config makes them."""
    label = B.Config(mode, k if mode == "speculative" else 0, t).label
    record = {
        "config": label,
        "mode": mode,
        "k": k,
        "temperature": t,
        "prompt_id": prompt,
        "category": "c",
        "new_tokens": new_tokens,
        "wall_s": new_tokens / tps,
        "tokens_per_s": tps,
        "drafted": drafted,
        "accepted": accepted,
        "rounds": rounds,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_per_round": accepted / rounds if rounds else None,
    }
    record.update(extra)
    return record


MICRO = {
    "target_step_s": 0.010,
    "draft_step_s": 0.003,
    "verify_s": {"2": 0.012, "4": 0.014},
    "weight_bound_s": 0.008,
    "target_step_weight_bytes": 80_000_000,
    "draft_step_weight_bytes": 20_000_000,
    "bandwidth": {"bandwidth_gb_s": 10.0, "read_gb_s": 10.0, "copy_gb_s": 9.0, "tensor_bytes": 1 << 29, "reps": 3},
    "agreement": {"agreement": 0.97, "positions": 100, "per_prompt": [0.97], "target_reproduces_continuation": 1.0},
    "context_tokens": 100,
    "reps": 3,
}


def good_runs():
    """Synthetic runs for which every goal passes."""
    runs = []
    for t, std, spec2, spec4, auto, hfa, a2 in (
        (0.0, 25.0, 60.0, 55.0, 59.0, 30.0, 0.9),
        (0.7, 25.0, 40.0, 38.0, 39.0, 20.0, 0.8),
    ):
        for p, jitter in (("p0", 1.0), ("p1", 1.2), ("p2", 0.8)):
            runs += [
                run("hf-generate", 10.0 * jitter, t=t, prompt=p),
                run("hf-assisted", hfa * jitter, t=t, prompt=p),
                run("standard", std * jitter, t=t, prompt=p),
                run(
                    "speculative", spec2 * jitter, k=2, t=t, prompt=p, drafted=100, accepted=round(100 * a2), rounds=50
                ),
                run("speculative", spec4 * jitter, k=4, t=t, prompt=p, drafted=100, accepted=70, rounds=25),
                run("auto-k", auto * jitter, t=t, prompt=p, drafted=100, accepted=80, rounds=40),
            ]
    # auto-k records carry the K they chose
    for r in runs:
        if r["mode"] == "auto-k":
            r["k"] = 3
    return runs


def statuses(summary, micro):
    return [g.status for g in B.evaluate_goals(summary, micro)]


# --- options and prompts ----------------------------------------------------------------


def bench_args(*flags):
    return build_parser().parse_args(["bench", *flags])


def test_parse_list():
    assert B.parse_list("1, 2,4,2", int, "k") == (1, 2, 4)
    assert B.parse_list(None, int, "k") is None
    assert B.parse_list("  ", int, "k") is None
    with pytest.raises(ValueError, match="--k"):
        B.parse_list("1,x", int, "k")


def test_resolve_options_quick_and_overrides():
    settings = load_settings()
    quick = B.resolve_options(settings, bench_args("--quick"))
    assert quick.quick and quick.repeats == 1 and quick.ks == B.QUICK["ks"]
    assert quick.max_new_tokens == B.QUICK["max_new_tokens"] and quick.prompt_limit == B.QUICK["prompt_limit"]
    assert quick.modes == B.MODES
    full = B.resolve_options(
        settings,
        bench_args(
            "--k",
            "8,2",
            "--temperature",
            "0.7",
            "--modes",
            "standard,speculative",
            "--repeats",
            "2",
            "--max-new-tokens",
            "20",
            "--out",
            "x",
        ),
    )
    assert full.ks == (2, 8) and full.temperatures == (0.7,) and full.modes == ("standard", "speculative")
    assert full.repeats == 2 and full.max_new_tokens == 20 and full.out == Path("x") and full.prompt_limit is None


@pytest.mark.parametrize(
    "flags, message",
    [(("--modes", "standard,turbo"), "turbo"), (("--k", "0"), "1..16"), (("--temperature", "-1"), "temperature")],
)
def test_resolve_options_rejects_bad_values(flags, message):
    with pytest.raises(ValueError, match=message):
        B.resolve_options(load_settings(), bench_args(*flags))


def test_shipped_prompts_are_varied():
    prompts = B.load_prompts(B.DEFAULT_PROMPTS)
    assert len(prompts) >= 20
    assert {"chat", "code", "summarization", "reasoning"} <= {p["category"] for p in prompts}
    assert len({p["id"] for p in prompts}) == len(prompts)
    # summarization prompts carry their text inline
    assert all(len(p["prompt"]) > 200 for p in prompts if p["category"] == "summarization")


def test_load_prompts_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "category": "c"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        B.load_prompts(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "category": "c", "prompt": "x"}\n{"id": "a", "category": "c", "prompt": "y"}\n')
    with pytest.raises(ValueError, match="duplicate"):
        B.load_prompts(dup)
    with pytest.raises(ValueError, match="cannot read"):
        B.load_prompts(tmp_path / "missing.jsonl")


def test_select_prompts_round_robin_over_categories():
    prompts = [{"id": f"{c}{i}", "category": c, "prompt": "x"} for c in "abc" for i in range(3)]
    assert [p["id"] for p in B.select_prompts(prompts, 4)] == ["a0", "b0", "c0", "a1"]
    assert B.select_prompts(prompts, None) == prompts


def test_configs_and_rotation():
    options = B.Options(ks=(2, 4), temperatures=(0.0,), modes=("standard", "speculative", "auto-k"))
    labels = [c.label for c in B.build_configs(options)]
    assert labels == ["standard T=0", "speculative K=2 T=0", "speculative K=4 T=0", "auto-k T=0"]
    assert B.rotated([1, 2, 3], 1) == [2, 3, 1] and B.rotated([1, 2, 3], 4) == [2, 3, 1]


# --- summaries, ratios, theory -----------------------------------------------------------------


def test_spread_exact():
    assert B.spread([3.0, None, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert B.spread([None]) is None


def test_summarize_medians_and_pooled_acceptance():
    runs = [
        run("standard", 10.0, prompt="p0"),
        run("standard", 20.0, prompt="p1"),
        run("standard", 40.0, prompt="p2"),
        run("speculative", 30.0, k=4, prompt="p0", drafted=40, accepted=30, rounds=10),
        run("speculative", 50.0, k=4, prompt="p1", drafted=20, accepted=5, rounds=5),
    ]
    summary = B.summarize(runs)
    std = summary["standard T=0"]
    assert std["tokens_per_s"] == {"median": 20.0, "min": 10.0, "max": 40.0, "n": 3}
    assert std["runs"] == 3 and std["pooled_acceptance_rate"] is None
    spec = summary["speculative K=4 T=0"]
    assert spec["tokens_per_s"] == {"median": 40.0, "min": 30.0, "max": 50.0, "n": 2}
    assert spec["pooled_acceptance_rate"] == pytest.approx(35 / 60)
    assert spec["pooled_accepted_per_round"] == pytest.approx(35 / 15)
    assert spec["acceptance_rate"]["median"] == pytest.approx((0.75 + 0.25) / 2)
    ratios = B.speedups(summary)
    assert ratios["speculative K=4 T=0"]["vs_standard"] == pytest.approx(2.0)
    assert ratios["standard T=0"]["vs_hf_generate"] is None


def test_alpha_counts_only_tested_drafts():
    # K=4: round 1 all accepted (bonus), round 2 accepts 1 then a rejection -> 5 accepted, 1 rejection
    runs = [run("speculative", 30.0, k=4, drafted=8, accepted=5, rounds=2, rejected=1)]
    entry = B.summarize(runs)["speculative K=4 T=0"]
    assert entry["pooled_acceptance_rate"] == pytest.approx(5 / 8)
    assert entry["alpha"] == pytest.approx(5 / 6)
    rows = B.theory(B.summarize(runs + [run("standard", 20.0)]), MICRO)
    assert rows["speculative K=4 T=0"]["a"] == pytest.approx(5 / 6)
    assert rows["speculative K=4 T=0"]["accepted_over_drafted"] == pytest.approx(5 / 8)


def test_time_split_exact():
    runs = [run("standard", 10.0, new_tokens=10, prefill_s=0.1, draft_s=0.0, target_s=0.8)]  # wall 1.0 s
    split = B.summarize(runs)["standard T=0"]["time_split"]
    assert split == pytest.approx({"prefill": 0.1, "draft": 0.0, "target": 0.8, "other": 0.1})


def test_theory_exact():
    runs = [run("standard", 20.0), run("speculative", 36.0, k=2, drafted=10, accepted=5, rounds=5)]
    rows = B.theory(B.summarize(runs), MICRO)
    row = rows["speculative K=2 T=0"]
    e = (1 - 0.5**3) / (1 - 0.5)  # 1.75
    assert row["a"] == pytest.approx(0.5) and row["expected_tokens"] == pytest.approx(e)
    assert row["c"] == pytest.approx(0.3)
    assert row["simple"] == pytest.approx(e / (1 + 2 * 0.3))
    assert row["with_verify"] == pytest.approx(e * 0.010 / (2 * 0.003 + 0.012))
    assert row["measured"] == pytest.approx(1.8)
    assert row["measured_over_with_verify"] == pytest.approx(1.8 / (e * 0.010 / 0.018))


def test_best_fixed_k_and_headline():
    summary = B.summarize(good_runs())
    assert B.best_fixed_k(summary, 0.0) == "speculative K=2 T=0"
    assert B.best_fixed_k(summary, 0.3) is None
    table = B.headline_table(summary, B.paired_vs_standard(good_runs()))
    lines = table.strip().splitlines()
    assert lines[0].startswith("| configuration") and len(lines) == 2 + len(summary)
    assert "| speculative K=2 T=0 | 60.0 (48.0–72.0) | 2.40× | 2.40× | 6.00× | 0.90 | 3 |" in table
    assert "auto-k T=0 (chose K 3)" in table
    assert "| standard T=0 | 25.0 (20.0–30.0) | 1.00× | – | 2.50× | – | 3 |" in B.headline_table(summary)


def test_paired_ratio_cancels_per_prompt_slowdowns():
    # prompt p1 ran while the machine was busy: both configurations at half speed
    runs = [
        run("standard", 20.0, prompt="p0"),
        run("speculative", 40.0, k=2, prompt="p0"),
        run("standard", 10.0, prompt="p1"),
        run("speculative", 20.0, k=2, prompt="p1"),
        run("standard", 21.0, prompt="p2"),
        run("speculative", 33.6, k=2, prompt="p2"),
    ]
    paired = B.paired_vs_standard(runs)
    assert paired["standard T=0"] == 1.0
    assert paired["speculative K=2 T=0"] == pytest.approx(2.0)  # median of 2.0, 2.0, 1.6
    assert B.speedups(B.summarize(runs))["speculative K=2 T=0"]["vs_standard"] == pytest.approx(33.6 / 20.0)


# --- goals ---------------------------------------------------------------------------------


def test_goals_all_pass():
    summary = B.summarize(good_runs())
    goals = B.evaluate_goals(summary, MICRO)
    assert [g.status for g in goals] == ["PASS"] * 5, [g.to_dict() for g in goals]
    assert all(not g.explanation for g in goals)
    first = goals[0].to_dict()
    assert first["checks"][0]["value"] == pytest.approx(2.5) and first["checks"][0]["ok"]
    assert first["checks"][-1]["value"] == pytest.approx(1.25)


def test_goals_all_fail_with_numbers():
    runs = good_runs()
    for r in runs:
        scale = {"standard": 0.6, "speculative": 20.0 / 60.0}.get(r["mode"])
        if scale:  # standard only 1.5x hf-generate; speculative (K=2) only 1.33x standard
            r["tokens_per_s"] *= scale
            r["wall_s"] /= scale
        if r["mode"] == "auto-k":  # below the best K and below hf-assisted
            r["tokens_per_s"] = 12.0
    micro = copy.deepcopy(MICRO)
    micro["target_step_s"] = 0.020  # 2.5x the bound
    micro["draft_step_s"] = 0.010  # c = 0.5
    micro["agreement"]["agreement"] = 0.90
    summary = B.summarize(runs)
    goals = B.evaluate_goals(summary, micro)
    assert [g.status for g in goals] == ["FAIL"] * 5, [g.to_dict() for g in goals]
    for goal in goals:
        assert goal.explanation and all(any(ch.isdigit() for ch in line) for line in goal.explanation)
    assert "2.50x the bound" in goals[0].explanation[-1]
    assert any("0.900" in line for line in goals[1].explanation)
    # goal 3 says what the measured a and c allow at most
    assert "at most" in goals[2].explanation[0]


def test_goal_threshold_edges():
    assert B.Check("x", 2.0, 2.0).ok is True
    assert B.Check("x", 1.999, 2.0).ok is False
    assert B.Check("x", 1.5, 1.5, higher_is_better=False).ok is True
    assert B.Check("x", 1.51, 1.5, higher_is_better=False).ok is False
    assert B.Check("x", None, 1.0).ok is None


def test_goals_not_measured_without_runs():
    micro = {"verify_s": {}, "bandwidth": MICRO["bandwidth"]}
    assert statuses({}, micro) == ["NOT MEASURED"] * 5


def test_cost_and_acceptance_needed_are_consistent():
    a, target = 0.8, 2.0
    c = goals.cost_needed(a, target)
    assert c is not None and goals.speedup_ceiling(a, c)[1] == pytest.approx(target)
    assert goals.speedup_ceiling(a, c * 1.05)[1] < target
    need_a = goals.acceptance_needed(0.3, target)
    assert goals.speedup_ceiling(need_a, 0.3)[1] >= target > goals.speedup_ceiling(need_a - 0.001, 0.3)[1]


def test_goals_read_the_threshold_table():
    summary = B.summarize(good_runs())  # standard runs at 2.5x hf-generate
    assert B.evaluate_goals(summary, MICRO)[0].status == "PASS"
    stricter = {**B.GOALS, "standard_vs_hf": 3.0}
    goal = B.evaluate_goals(summary, MICRO, stricter)[0]
    assert goal.status == "FAIL" and goal.checks[0].threshold == 3.0 and "3x hf-generate" in goal.title
    # the report shows each check with the direction the goal gave it, not one guessed from its name
    check = goal.to_dict()["checks"][-1]
    assert check["higher_is_better"] is False and "(needs <= 1.5)" in B.Check.from_dict(check).text()


def test_k_choice_is_described_from_its_dict():
    auto = KChoice(k=7, auto=True, acceptance_rate=0.981, cost_ratio=0.294, verify_slope=0.05, expected_speedup=2.1)
    assert runs.describe_k_choice(auto.to_dict()) == "auto: a=0.98 c=0.29 → K=7"
    assert runs.describe_k_choice({**auto.to_dict(), "k": 0}) == "auto: a=0.98 c=0.29 → standard"
    assert runs.describe_k_choice(KChoice(k=4, auto=False).to_dict()) == "fixed K=4"
    assert runs.describe_k_choice(None) == "standard"


# --- tiny models, end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatapp.llama import LlamaDecoderLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    hf = LlamaForCausalLM(config).eval()
    target = LlamaDecoderLM.from_hf(hf)
    draft = LlamaDecoderLM.from_hf(hf, quantize="int8-weight-only")
    hf_draft = B.fake_quantize_int8(copy.deepcopy(hf))
    return B.Models(target=target, draft=draft, stop_ids=(), hf_target=hf, hf_draft=hf_draft, pad_id=0)


def test_fake_quantized_copy_matches_the_int8_draft(tiny):
    ids = list(range(5, 25))
    cache = tiny.draft.new_cache(32)
    ours = tiny.draft.forward(ids, 0, cache)
    with torch.inference_mode():
        theirs = tiny.hf_draft(torch.tensor([ids])).logits[0].float()
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # and it differs from the float target (the quantization happened)
    with torch.inference_mode():
        full = tiny.hf_target(torch.tensor([ids])).logits[0].float()
    assert not torch.equal(full, theirs)


def test_agreement_of_identical_models_is_one(tiny):
    seq = [(tuple(range(3, 13)), list(range(40, 60)))]
    result = B.measure_agreement(tiny.target, tiny.target, seq)
    assert result["agreement"] == 1.0 and result["positions"] == 20


def test_tiny_end_to_end(tiny, tmp_path):
    prompts = [B.BenchPrompt(f"p{i}", "cat", tuple(range(3 + i, 15 + i))) for i in range(2)]
    options = B.Options(
        max_new_tokens=10,
        ks=(2, 3),
        temperatures=(0.0, 0.7),
        warmup_tokens=4,
        micro_reps=2,
        bandwidth_mb=8,
        out=tmp_path,
    )
    result = B.bench(tiny, prompts, options, progress=lambda message: None)
    result["timing"]["total_s"] = 1.0
    B.finish(result)
    files = B.write_outputs(result, tmp_path, progress=lambda message: None)

    for name in (
        "results.json",
        "report.md",
        "acceptance_vs_k.png",
        "speedup_vs_k.png",
        "measured_vs_theory.png",
        "tokens_per_s.png",
    ):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "results.json").read_text())
    configs = B.build_configs(options)
    assert len(data["runs"]) == len(configs) * len(prompts)
    # interleaved: each prompt's runs are contiguous, and the order rotates per prompt
    assert [r["config"] for r in data["runs"][: len(configs)]] == [c.label for c in configs]
    assert [r["config"] for r in data["runs"][len(configs) :]] == [c.label for c in B.rotated(configs, 1)]
    for r in data["runs"]:
        assert r["new_tokens"] == 10 and r["wall_s"] > 0 and r["tokens_per_s"] > 0
        for key in ("mode", "k", "temperature", "prompt_id", "peak_rss_bytes"):
            assert key in r
        if r["mode"] in HF_MODES:
            continue
        # our engine's record: its TurnStats.to_dict() fields plus the bench's own
        assert {"rounds", "drafted", "accepted", "rejected", "target_forwards", "engine_wall_s"} <= set(r)
        assert r["decoding"] == ("speculative" if r["k"] else "standard")
        if r["mode"] == "standard":
            assert r["k_choice"] is None
        elif r["mode"] == "speculative":
            assert r["k_choice"] == KChoice(k=r["k"], auto=False).to_dict()
        else:  # auto-k: the tracker's choice, as a dict; K = 0 means it ran standard decoding
            assert r["k_choice"]["auto"] is True and r["k_choice"]["k"] == r["k"]
            assert r["k_choice"]["cost_ratio"] > 0
        if r["decoding"] == "speculative":
            assert 0 <= r["acceptance_rate"] <= 1 and r["draft_step_s"] > 0 and r["verify_step_s"] > 0
    micro = data["micro"]
    assert micro["target_step_s"] > 0 and micro["draft_step_s"] > 0 and set(micro["verify_s"]) == {"2", "3"}
    assert micro["bandwidth"]["bandwidth_gb_s"] > 0 and micro["weight_bound_s"] > 0
    assert micro["bandwidth"]["measured"] == "interleaved with the step reps"
    assert 0 <= micro["agreement"]["agreement"] <= 1
    assert micro["agreement"]["target_reproduces_continuation"] == 1.0
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["cores"]
    # greedy: every speculative / auto-k output is the standard output, token for token
    for mode in ("speculative", "auto-k"):
        same, total = data["correctness"][mode]
        assert same == total > 0
    report = (tmp_path / "report.md").read_text()
    assert "## Headline" in report and "## Goals" in report
    assert report.count("**PASS**") + report.count("**FAIL**") + report.count("**NOT MEASURED**") == 5
    assert "speculative K=3 T=0.7" in report and "tokens_per_s.png" in report
    assert files["report"] == tmp_path / "report.md"
    assert "## Auto-K trackers at the end" in report and "- T=0: auto: a=" in report
    assert B.headline_from_results(tmp_path / "results.json") == B.headline_table(
        result["summary"], result["paired_vs_standard"]
    )


class StandardChoosingTracker(AcceptanceTracker):
    """A tracker whose auto K always answers K = 0: standard decoding would be faster."""

    def choose(self, k, auto):
        return KChoice(k=0, auto=True, acceptance_rate=0.5, cost_ratio=0.9, verify_slope=0.1, expected_speedup=0.8)


def test_auto_k_choosing_standard_runs_standard_decoding(tiny):
    prompt = B.BenchPrompt("p0", "cat", tuple(range(3, 15)))
    options = B.Options(max_new_tokens=8)
    kwargs = {"max_new_tokens": 8, "seed": 0, "options": options}
    auto = B.run_config(tiny, B.Config("auto-k", 0, 0.0), prompt, tracker=StandardChoosingTracker(), **kwargs)
    standard = B.run_config(tiny, B.Config("standard", 0, 0.0), prompt, **kwargs)
    assert auto["mode"] == "auto-k" and auto["decoding"] == "standard" and auto["k"] == 0
    assert auto["k_choice"] == StandardChoosingTracker().choose(4, True).to_dict()
    assert auto["drafted"] == 0 and auto["draft_forwards"] == 0
    assert auto["token_ids"] == standard["token_ids"]
    with pytest.raises(ValueError, match="auto-k needs"):
        B.run_config(tiny, B.Config("auto-k", 0, 0.0), prompt, **kwargs)


def test_deadline_keeps_at_least_two_prompts_and_lists_the_rest(tiny):
    prompts = [B.BenchPrompt(f"p{i}", "cat", tuple(range(3 + i, 12 + i))) for i in range(4)]
    options = B.Options(
        max_new_tokens=4,
        ks=(2,),
        temperatures=(0.0,),
        modes=("standard", "speculative"),
        warmup_tokens=2,
        micro_reps=1,
        bandwidth_mb=8,
    )
    import time

    result = B.bench(tiny, prompts, options, progress=lambda message: None, deadline=time.perf_counter())
    assert {r["prompt_id"] for r in result["runs"]} == {"p0", "p1"}
    assert result["skipped_prompts"] == ["p2 (repeat 0)", "p3 (repeat 0)"]
    assert len(result["runs"]) == 2 * 2


def test_the_app_keeps_freed_memory_for_reuse():
    import platform

    from chatapp.cli import keep_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert keep_freed_memory()


def test_a_speculative_run_times_no_reference_steps(tiny):
    # The app's in-reply speedup figure costs 3 target steps per reply; the bench measures standard
    # decoding in its own runs, so its speculative wall time carries none of them.
    prompt = B.BenchPrompt("p0", "cat", tuple(range(3, 15)))
    kwargs = {"max_new_tokens": 8, "seed": 0, "options": B.Options(max_new_tokens=8)}
    run = B.run_config(tiny, B.Config("speculative", 3, 0.0), prompt, **kwargs)
    assert run["decoding"] == "speculative" and run["rounds"] > 0
    assert run["reference_steps"] == 0 and run["reference_s"] == 0
