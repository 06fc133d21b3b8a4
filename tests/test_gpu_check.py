"""Tests of `python main.py bench --gpu-check` (chatapp/bench/gpu_check.py) without a GPU.

The whole check runs once with --tiny through the CLI (the same code as on a GPU, tiny shapes on the CPU):
every section of the JSON is there, speculative greedy output equals standard's, the Markdown is written.
Without CUDA the plain flag ends in one line and exit status 2. The projection, the reading of the CPU
bench's acceptance and the shapes of the Qwen2.5 models are checked on their own.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from chatapp import cli
from chatapp.bench import gpu_check as G
from chatapp.stats import expected_speedup_with_costs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(exit code, stdout, the JSON, the Markdown) of one `bench --gpu-check --tiny` with no CPU results."""
    out = tmp_path_factory.mktemp("gpu-check")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(G, "CPU_RESULTS", out / "absent-results.json")
        code = cli.main(["bench", "--gpu-check", "--tiny", "--out", str(out)])
    data = json.loads((out / "gpu-check.json").read_text())
    return code, stdout.getvalue(), data, (out / "gpu-check.md").read_text()


def test_tiny_check_has_every_section_and_identical_greedy_output(tiny):
    code, stdout, data, _ = tiny
    assert code == 0
    assert set(G.SECTIONS) <= set(data)
    equality = data["greedy_equality"]
    assert equality["result"] == "identical", equality["first_difference"]
    plan = G.TINY_PLAN
    assert equality["replies_compared"] == 2 * len(plan.ks) * plan.prompts  # two drafts, every K, every prompt
    assert "greedy equality: identical" in stdout
    assert [g["goal"] for g in data["goals"]] == list(range(1, 8))
    assert {g["status"] for g in data["goals"]} <= {"PASS", "FAIL", "NOT MEASURED", "INCOMPLETE"}


def test_tiny_check_measures_what_the_issue_asks(tiny):
    _, _, data, _ = tiny
    costs = data["costs"]
    assert costs["target_step_s"] > 0 and costs["weight_bound_s"] > 0 and costs["bandwidth"]["bandwidth_gb_s"] > 0
    assert list(costs["verify_in_steps"]) == [str(m) for m in range(2, 10)]
    assert costs["c"] == pytest.approx(costs["draft_step_s"] / costs["target_step_s"])
    assert data["load"]["draft"]["quantization"].startswith("int8 weight-only")
    assert data["load"]["peak_bytes"] is None  # no CUDA: not measured, not made up
    throughput = data["throughput"]
    assert throughput["hf_model_same_weights"] is True  # generate() ran the target's own weights
    assert throughput["hf_generate_tokens_per_s"] > 0 and set(throughput["speculative_pair"]) == {"2", "4", "8"}
    assert data["self_draft"]["best_k"] in G.TINY_PLAN.ks
    assert all(0 <= v["a"] <= 1 for v in data["self_draft"]["per_k"].values())
    projection = data["projection"]
    assert [row["a"] for row in projection["rows"]] == list(G.ASSUMED_RATES)  # the CPU rate is missing here
    assert projection["cpu_acceptance"]["a"] is None and projection["cpu_acceptance"]["source"].startswith("missing")


def test_tiny_check_writes_the_markdown(tiny):
    _, _, data, md = tiny
    assert md.startswith("# GPU check: tiny shapes")
    for goal in data["goals"]:
        assert goal["title"] in md
    assert "greedy equality: **identical**" in md and "CPU-measured a: missing" in md


def test_without_cuda_the_check_ends_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--gpu-check", "--out", str(tmp_path)]) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --gpu-check needs a CUDA GPU") and "--tiny" in lines[0]
    assert captured.out == "" and not list(tmp_path.iterdir())


def test_tiny_alone_is_refused(capsys):
    assert cli.main(["bench", "--tiny"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == "error: --tiny goes with --gpu-check"


@pytest.mark.parametrize("shape, parameters", [(G.QWEN_7B, 7_615_616_512), (G.QWEN_05B, 494_032_768)])
def test_the_gpu_shapes_are_qwen2_5s(shape, parameters):
    # The parameter counts of Qwen2.5-7B and Qwen2.5-0.5B (tied embeddings counted once); built on "meta": no memory.
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**shape, **G.QWEN_COMMON))
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model.config.rope_parameters["rope_theta"] == 1e6 and model.config.rms_norm_eps == 1e-6


def test_cpu_acceptance_is_read_from_the_cpu_bench(tmp_path):
    path = tmp_path / "results.json"
    summary = {
        "speculative K=2 T=0": {"mode": "speculative", "temperature": 0.0, "alpha": 0.96},
        "speculative K=4 T=0": {"mode": "speculative", "temperature": 0.0, "alpha": 0.98},
        "speculative K=6 T=0": {
            "mode": "speculative",
            "temperature": 0.0,
            "alpha": None,
            "pooled_acceptance_rate": 0.90,
        },
        "speculative K=4 T=0.7": {"mode": "speculative", "temperature": 0.7, "alpha": 0.5},
        "standard T=0": {"mode": "standard", "temperature": 0.0, "alpha": None},
    }
    path.write_text(json.dumps({"summary": summary}))
    found = G.cpu_acceptance(path)
    assert found["a"] == pytest.approx(0.96) and "measured" in found["source"]  # median of 0.96, 0.98, 0.90
    assert G.cpu_acceptance(tmp_path / "absent.json")["a"] is None
    path.write_text(json.dumps({"summary": {"standard T=0": summary["standard T=0"]}}))
    assert G.cpu_acceptance(path)["a"] is None


def costs(c: float, verify: float = 1.0) -> dict:
    return {"c": c, "verify_in_steps": {m: verify for m in G.VERIFY_TOKENS}}


def test_projection_takes_the_best_k_with_the_measured_costs():
    assert G.best_projection(0.0, costs(0.1))[0] == 1  # nothing accepted: the shortest round loses least
    assert G.best_projection(0.95, costs(0.0))[0] == 8  # free drafts: the longest round measured
    k, speedup = G.best_projection(0.8, costs(0.05, 1.1))
    assert speedup == pytest.approx(max(expected_speedup_with_costs(0.8, j, 0.05, 1.1) for j in range(1, 9)))
    assert speedup == pytest.approx(expected_speedup_with_costs(0.8, k, 0.05, 1.1))
    needed = G.acceptance_needed(costs(0.05, 1.1), 1.8)
    assert G.best_projection(needed, costs(0.05, 1.1))[1] >= 1.8 > G.best_projection(needed - 0.01, costs(0.05, 1.1))[1]
    assert G.acceptance_needed(costs(1.0, 1.0), 1.8) is None  # a draft as costly as the target never reaches it


def test_first_difference():
    assert G.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert G.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert G.first_difference([1, 2], [1, 2, 3]) == 2
