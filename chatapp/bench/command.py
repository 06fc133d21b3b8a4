"""`python main.py bench`: options, prompts, models, the bench, then the files and the headline.

Contract: `run_bench(settings, args)` is the sub-command (chatapp.cli calls
it with the loaded settings and the parsed flags): it writes results.json,
report.md and the plots to --out, prints the headline table (markdown) and
one line per goal to stdout, progress to stderr, and returns the exit code.
`finish` completes a raw result (loop.bench) with the summary, ratios,
theory, goals and correctness; `write_outputs` writes the files.

The variant section (variants.py) runs after the main runs, at their best K
at T=0 unless --variant-k, and lands under results.json's "variants" key and
in report.md; its table and goals are printed after the headline. Alone
(`--variants`) it leaves a full run's results in --out as they were: it
replaces only their "variants" key and re-renders their report.md.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from transformers.utils import logging as hf_logging

from ..errors import progress_to_stderr
from ..models import Progress
from .baselines import Models, load_models
from .goals import evaluate_goals
from .gpu_check import run_gpu_check
from .loop import bench, deadline_for, service_tracker
from .options import Options, jsonable, resolve_options
from .plots import plot
from .prompts import BenchPrompt, encode_prompts, load_prompts, select_prompts
from .report import headline_table, variants_table, write_report, write_variants_report
from .summary import best_fixed_k, correctness, paired_vs_standard, speedups, summarize, theory
from .ttft import run_ttft
from .variants import VARIANT_K, finish_variants, run_variants


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
    """results.json, the plots and report.md in `out` (the variant section alone: write_variant_outputs)."""
    if "runs" not in result:
        return write_variant_outputs(result["variants"], out)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(result, out, progress)
    report = write_report(result, out / "report.md", plots)
    results = out / "results.json"
    results.write_text(json.dumps(jsonable(result), indent=1, default=str) + "\n", encoding="utf-8")
    return {"results": results, "report": report, **{p.stem: p for p in plots}}


def _earlier_full_result(path: Path) -> dict | None:
    """The full bench's result already at `path`, or None (none there, unreadable, or a variant section alone)."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and "runs" in result and "summary" in result else None


def write_variant_outputs(section: dict, out: Path) -> dict[str, Path]:
    """The variant section alone: into a full run's results.json and report.md already in `out`, else its own."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    earlier = _earlier_full_result(results)
    if earlier is not None:
        earlier["variants"] = section
        result = earlier
        report = write_report(earlier, out / "report.md", sorted(out.glob("*.png")))
    else:
        result = {"variants": section}
        report = write_variants_report(section, out / "report.md")
    results.write_text(json.dumps(jsonable(result), indent=1, default=str) + "\n", encoding="utf-8")
    return {"results": results, "report": report}


def _encoded(models: Models, items: list[dict], limit: int | None, options: Options, max_new: int, k: int):
    """The first `limit` prompts (balanced over categories) as token ids that leave room for the reply."""
    context = min(models.target.max_positions, models.draft.max_positions)
    max_prompt = context - max_new - k - 2
    return encode_prompts(models.tokenizer, select_prompts(items, limit), options.system_prompt, max_prompt)


def _loading(options: Options) -> Options:
    """The options load_models reads: the variant section needs hf-generate's model, not hf-assisted's."""
    if options.variants_only:
        return dataclasses.replace(options, modes=("hf-generate",))
    if options.variants and "hf-generate" not in options.modes:
        return dataclasses.replace(options, modes=options.modes + ("hf-generate",))
    return options


def _main_runs(models: Models, items: list[dict], options: Options, progress: Progress, started: float) -> dict:
    encoded = _encoded(models, items, options.prompt_limit, options, options.max_new_tokens, max(options.ks))
    deadline = deadline_for(started, options)
    result = bench(models, encoded, options, progress, deadline=deadline, tracker_factory=service_tracker(models))
    result["timing"] = {"load_s": models.load_s, **result["timing"]}
    return finish(result)


def _variant_section(models: Models, items: list[dict], options: Options, progress: Progress, summary) -> dict:
    """The variant section at --variant-k, else the main runs' best K at T=0, else VARIANT_K."""
    best = best_fixed_k(summary, 0.0) if summary else None
    k = options.variant_k or (summary[best]["k"] if best else VARIANT_K)
    prompts: list[BenchPrompt] = _encoded(
        models, items, options.variant_prompt_limit, options, options.variant_max_new_tokens, k
    )
    return finish_variants(run_variants(models, prompts, options, progress, k=k))


def run_bench(settings, args) -> int:
    """`python main.py bench`: load, run, write; the headline table to stdout (`--gpu-check`: gpu_check.py)."""
    if getattr(args, "gpu_check", False) or getattr(args, "tiny", False):
        return run_gpu_check(args)
    if getattr(args, "ttft", False):
        return run_ttft(settings, args)
    started = time.perf_counter()
    progress = progress_to_stderr("bench")
    options = resolve_options(settings, args)
    items = load_prompts(options.prompts_path)  # a bad prompt file fails before the models load
    if not options.variants_only:
        progress(
            f"{len(select_prompts(items, options.prompt_limit))} prompts, modes {','.join(options.modes)}, "
            f"K {options.ks}, T {options.temperatures}, {options.max_new_tokens} new tokens"
        )
    if options.variants:
        progress(
            f"variant section: {len(select_prompts(items, options.variant_prompt_limit))} prompts, "
            f"{options.variant_max_new_tokens} new tokens, T=0"
        )
    hf_logging.set_verbosity_error()  # generate()'s warnings would bury the progress lines
    models = load_models(settings, _loading(options), progress)
    result = {} if options.variants_only else _main_runs(models, items, options, progress, started)
    if options.variants:
        result["variants"] = _variant_section(models, items, options, progress, result.get("summary"))
    if "timing" in result:
        if result.get("variants", {}).get("timing"):
            result["timing"]["variants_s"] = result["variants"]["timing"]["total_s"]
        result["timing"]["total_s"] = time.perf_counter() - started  # everything but writing the files
    files = write_outputs(result, options.out, progress)
    progress(f"wrote {', '.join(str(p) for p in files.values())}; {time.perf_counter() - started:.0f} s in all")
    _print_tables(result)
    return 0


def _print_tables(result: dict) -> None:
    """The headline and the goals, then the variant table and its goals, to stdout."""
    if "summary" in result:
        print(headline_table(result["summary"], result["paired_vs_standard"]))
        for goal in result["goals"]:
            print(f"- goal {goal['goal']} ({goal['title']}): {goal['status']}")
    section = result.get("variants")
    if section:
        print()
        print(variants_table(section))
        for goal in section.get("goals", []):
            print(f"- variant goal {goal['goal']} ({goal['title']}): {goal['status']}")
