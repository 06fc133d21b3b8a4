"""`python main.py bench`: standard vs speculative decoding, measured.

Every mode runs in one process on the same prompts, interleaved: for each
prompt, every configuration once, in an order rotated per prompt, after one
warm-up run per configuration. Every run starts from fresh caches (a new
`Generation`, or a new `generate()` call). Modes:

    hf-generate   transformers `generate()` on the target's HF model (dynamic cache)
    hf-assisted   transformers assisted generation, `generate(assistant_model=...)`,
                  with transformers' own defaults for the number of draft tokens.
                  The assistant is an HF copy of the draft: for our int8
                  weight-only draft, a copy of the source model whose weights
                  are fake-quantized to int8 per output row (dequantized fp32
                  values, the numerics of our draft)
    standard      our engine, target only
    speculative   our engine, for each K in --k
    auto-k        our engine, K chosen before every turn by the app's own
                  AcceptanceTracker.choose (chatapp.autok; one tracker per
                  temperature, seeded as ChatService.calibrate seeds the
                  app's), standard decoding when it answers K = 0

Besides the runs it measures micro step costs (target decode step, target
verify of K+1 tokens, draft step), the memory bandwidth and the
weight-reading bound of a decode step, and the draft's teacher-forced greedy
agreement with the target. It writes results.json, report.md and PNG plots
to --out, and prints the headline table (markdown) to stdout; progress goes
to stderr.

The package, in the order a run goes through it:

    options.py    flags -> Options (QUICK, limits from chatapp.settings)
    prompts.py    the JSONL prompts (prompts.jsonl), a balanced subset, token ids
    machine.py    CPU, versions, contention, peak memory
    baselines.py  loading the models; transformers generate() / assisted runs
    runs.py       Config, Slot (a configuration on a pair) and one run's record (our engine or a baseline)
    micro.py      step costs, bandwidth, weight-reading bound, agreement
    loop.py       the whole bench: warm-up, interleaving, time budget, micro
    summary.py    per-configuration figures, speedups, theory, correctness
    goals.py      the table of thresholds and the five goals' verdicts
    variants.py   the variant section: every kernel variant's pair end to end, micro, its goals
    report.py     report.md and the headline table
    plots.py      the PNG plots
    command.py    run_bench: all of it, for the CLI
    gpu_check.py  `bench --gpu-check [--tiny]`: the CUDA path on random-weight Qwen2.5-7B/0.5B shapes
"""

from .baselines import Models, fake_quantize_int8
from .command import finish, run_bench, write_outputs, write_variant_outputs
from .goals import GOALS, Check, Goal, evaluate_goals
from .gpu_check import run_gpu_check
from .loop import bench, calibrated_tracker, interleaved_runs, service_tracker, warm_up
from .micro import measure_agreement, measure_step_costs
from .options import DEFAULT_OUT, DEFAULT_PROMPTS, HF_MODES, MODES, QUICK, Options, parse_list, resolve_options
from .prompts import BenchPrompt, encode_prompts, load_prompts, select_prompts
from .report import headline_from_results, headline_table, variants_table, write_report, write_variants_report
from .runs import Config, Slot, build_configs, rotated, run_config, run_slot
from .summary import best_fixed_k, correctness, paired_vs_standard, speedups, spread, summarize, theory
from .variants import VARIANT_GOALS, VARIANT_K, evaluate_variant_goals, finish_variants, run_variants, variant_rows

__all__ = [
    "BenchPrompt",
    "Check",
    "Config",
    "DEFAULT_OUT",
    "DEFAULT_PROMPTS",
    "GOALS",
    "Goal",
    "HF_MODES",
    "MODES",
    "Models",
    "Options",
    "QUICK",
    "Slot",
    "VARIANT_GOALS",
    "VARIANT_K",
    "bench",
    "best_fixed_k",
    "build_configs",
    "calibrated_tracker",
    "correctness",
    "encode_prompts",
    "evaluate_goals",
    "evaluate_variant_goals",
    "fake_quantize_int8",
    "finish",
    "finish_variants",
    "headline_from_results",
    "headline_table",
    "interleaved_runs",
    "load_prompts",
    "measure_agreement",
    "measure_step_costs",
    "paired_vs_standard",
    "parse_list",
    "resolve_options",
    "rotated",
    "run_bench",
    "run_config",
    "run_gpu_check",
    "run_slot",
    "run_variants",
    "select_prompts",
    "service_tracker",
    "speedups",
    "spread",
    "summarize",
    "theory",
    "variant_rows",
    "variants_table",
    "warm_up",
    "write_outputs",
    "write_report",
    "write_variant_outputs",
    "write_variants_report",
]
