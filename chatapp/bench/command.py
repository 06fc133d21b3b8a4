"""`python main.py bench`: options, prompts, models, the bench, then the files and the headline.

Contract: `run_bench(settings, args)` is the sub-command (chatapp.cli calls
it with the loaded settings and the parsed flags): it writes results.json,
report.md and the plots to --out, prints the headline table (markdown) and
one line per goal to stdout, progress to stderr, and returns the exit code.
`finish` completes a raw result (loop.bench) with the summary, ratios,
theory, goals and correctness; `write_outputs` writes the files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers.utils import logging as hf_logging

from ..errors import progress_to_stderr
from ..models import Progress
from .baselines import load_models
from .goals import evaluate_goals
from .gpu_check import run_gpu_check
from .loop import bench, deadline_for, service_tracker
from .options import jsonable, resolve_options
from .plots import plot
from .prompts import encode_prompts, load_prompts, select_prompts
from .report import headline_table, write_report
from .summary import correctness, paired_vs_standard, speedups, summarize, theory
from .ttft import run_ttft


def finish(result: dict) -> dict:
    """Add the summary, ratios, theory, goals and correctness to a raw bench result."""
    summary = summarize(result["runs"])
    result["summary"] = summary
    result["speedups"] = speedups(summary)
    result["paired_vs_standard"] = paired_vs_standard(result["runs"])
    result["theory"] = theory(summary, result["micro"])
    result["goals"] = [g.to_dict() for g in evaluate_goals(summary, result["micro"])]
    result["correctness"] = correctness(result["runs"])
    return result


def write_outputs(result: dict, out: Path, progress: Progress) -> dict[str, Path]:
    """results.json, the plots and report.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(result, out, progress)
    report = write_report(result, out / "report.md", plots)
    results = out / "results.json"
    results.write_text(json.dumps(jsonable(result), indent=1, default=str) + "\n", encoding="utf-8")
    return {"results": results, "report": report, **{p.stem: p for p in plots}}


def run_bench(settings, args) -> int:
    """`python main.py bench`: load, run, write; the headline table to stdout (`--gpu-check`: gpu_check.py)."""
    if getattr(args, "gpu_check", False) or getattr(args, "tiny", False):
        return run_gpu_check(args)
    if getattr(args, "ttft", False):
        return run_ttft(settings, args)
    started = time.perf_counter()
    progress = progress_to_stderr("bench")
    options = resolve_options(settings, args)
    prompts = select_prompts(load_prompts(options.prompts_path), options.prompt_limit)
    progress(
        f"{len(prompts)} prompts, modes {','.join(options.modes)}, K {options.ks}, T {options.temperatures}, "
        f"{options.max_new_tokens} new tokens"
    )
    hf_logging.set_verbosity_error()  # generate()'s warnings would bury the progress lines
    models = load_models(settings, options, progress)
    context = min(models.target.max_positions, models.draft.max_positions)
    max_prompt = context - options.max_new_tokens - max(options.ks) - 2
    encoded = encode_prompts(models.tokenizer, prompts, options.system_prompt, max_prompt)
    deadline = deadline_for(started, options)
    result = bench(models, encoded, options, progress, deadline=deadline, tracker_factory=service_tracker(models))
    result["timing"] = {"load_s": models.load_s, **result["timing"]}
    finish(result)
    result["timing"]["total_s"] = time.perf_counter() - started  # everything but writing the files
    files = write_outputs(result, options.out, progress)
    progress(f"wrote {', '.join(str(p) for p in files.values())}; {time.perf_counter() - started:.0f} s in all")
    print(headline_table(result["summary"], result["paired_vs_standard"]))
    for goal in result["goals"]:
        print(f"- goal {goal['goal']} ({goal['title']}): {goal['status']}")
    return 0
