"""Command line: `specchat [desktop] | serve | generate | bench | prepare` (`python main.py ...` in a checkout).

No command, or flags only, is `desktop`: the app in its own window (`--browser`:
in the browser), one instance per user (chatapp.desktop); flags that only
`serve` knows (--host, --share, --no-browser) make it `serve`.

Every user error ends as one line on stderr and exit status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
import time

from .errors import one_line
from .settings import SettingsError, load_settings

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the usage block too
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="settings file (default: settings.toml, or $SPECCHAT_CONFIG)")
    parser.add_argument("--target", help="target model: hub id, local folder, .gguf file or embedded:NAME")
    parser.add_argument("--draft", help="draft model (default: INT8 copy of the target)")
    parser.add_argument("--preset", help="a [presets.NAME] pair from the settings file (--target/--draft win over it)")
    parser.add_argument("--device", help="auto, cpu or cuda")


def _decoding_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", help="speculative or standard")
    parser.add_argument("--k", type=int, help="draft tokens per round (1..16)")
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--top-p", type=float, dest="top_p")
    parser.add_argument("--top-k", type=int, dest="top_k")
    parser.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    parser.add_argument("--seed", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="specchat", description="Speculative-decoding chat app")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    desktop = sub.add_parser("desktop", help="the app in its own window, one instance per user (the default)")
    _model_flags(desktop)
    desktop.add_argument("--port", type=int, help="preferred port on 127.0.0.1 (another free one when it is busy)")
    desktop.add_argument("--browser", action="store_true", help="open the app in the browser instead of a window")

    serve = sub.add_parser("serve", help="serve the chat UI (on the network with --host 0.0.0.0)")
    _model_flags(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--share", action="store_true", default=None)
    serve.add_argument("--no-browser", action="store_true")
    serve.add_argument(
        "--openai-api",
        action="store_true",
        default=None,
        dest="openai_api",
        help="also serve the OpenAI-compatible POST /v1/chat/completions",
    )

    gen = sub.add_parser("generate", help="answer one prompt in the terminal")
    _model_flags(gen)
    _decoding_flags(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--system", help="system prompt")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    bench = sub.add_parser("bench", help="measure standard vs speculative decoding")
    _model_flags(bench)
    bench.add_argument("--prompts", help="JSONL prompt file (default: the shipped set)")
    bench.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    bench.add_argument("--k", help="comma-separated K values, e.g. 1,2,4,8")
    bench.add_argument("--temperature", help="comma-separated temperatures, e.g. 0,0.7")
    bench.add_argument("--modes", help="comma-separated: hf-generate,hf-assisted,standard,speculative,auto-k")
    bench.add_argument("--repeats", type=int)
    bench.add_argument("--out", help="output folder (default: bench-out)")
    bench.add_argument("--quick", action="store_true", help="a run of a few minutes")
    bench.add_argument(
        "--prompt-limit", type=int, dest="prompt_limit", help="run at most this many prompts (of --prompts' file)"
    )
    bench.add_argument(
        "--variants",
        action="store_true",
        help="only the CPU kernel variant section: every variant this CPU runs, end to end and micro",
    )
    bench.add_argument(
        "--no-variants", action="store_true", dest="no_variants", help="leave the variant section out of a full run"
    )
    bench.add_argument(
        "--variant-k", type=int, dest="variant_k", help="the variant section's K (default: the best K at T=0, else 6)"
    )
    bench.add_argument(
        "--gpu-check",
        action="store_true",
        dest="gpu_check",
        help="the CUDA path on random-weight Qwen2.5-7B/0.5B shapes (only --out applies)",
    )
    bench.add_argument(
        "--ttft", action="store_true", help="time to first token over a 10-turn chat, with and without the prefix cache"
    )
    bench.add_argument("--tiny", action="store_true", help="with --gpu-check: the same check on the CPU, tiny shapes")

    prepare = sub.add_parser("prepare", help="fetch and convert the embedded model, build the CPU kernels")
    _model_flags(prepare)
    return parser


def _settings(args):
    overrides = {
        "model.target": getattr(args, "target", None),
        "model.draft": getattr(args, "draft", None),
        "model.preset": getattr(args, "preset", None),  # under --target/--draft (chatapp.settings' precedence)
        "model.device": getattr(args, "device", None),
        "decoding.mode": getattr(args, "mode", None),
        "decoding.k": getattr(args, "k", None) if isinstance(getattr(args, "k", None), int) else None,
        "decoding.temperature": getattr(args, "temperature", None)
        if isinstance(getattr(args, "temperature", None), float)
        else None,
        "decoding.top_p": getattr(args, "top_p", None),
        "decoding.top_k": getattr(args, "top_k", None),
        "decoding.max_new_tokens": getattr(args, "max_new_tokens", None),
        "decoding.seed": getattr(args, "seed", None),
        "decoding.system_prompt": getattr(args, "system", None),
        "server.host": getattr(args, "host", None),
        "server.port": getattr(args, "port", None),
        "server.share": getattr(args, "share", None),
        "server.open_browser": False if getattr(args, "no_browser", False) else None,
        "server.openai_api": getattr(args, "openai_api", None),
    }
    return load_settings(args.config, overrides=overrides)


def _load(settings, quiet: bool = False):
    from .models import load_pair

    progress = (
        (lambda message: None)
        if quiet
        else (lambda message: print(f"specchat: {message}", file=sys.stderr, flush=True))
    )
    return load_pair(settings.model, progress=progress)


def cmd_generate(args) -> int:
    settings = _settings(args)
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    # Imported here: they pull in torch, which --help and a bad flag need not wait for.
    from .service import ChatService
    from .ui.format import stats_line

    pair = _load(settings, quiet=args.json)
    service = ChatService(pair, max_reply_seconds=settings.limits.max_reply_seconds)
    service.calibrate()
    history = [{"role": "user", "content": args.prompt}]
    turn = service.start_turn(history, settings.decoding, system=args.system)
    if turn.notice and not args.json:
        print(f"[{turn.notice}]", file=sys.stderr)
    for event in turn:
        if not args.json:
            print(event.text, end="", flush=True)
    if args.json:
        print(
            json.dumps(
                {
                    "text": turn.text,
                    "token_ids": [t.id for t in turn.tokens],
                    "sources": [t.source for t in turn.tokens],
                    "stats": turn.record(),
                    "target": pair.target.info.__dict__,
                    "draft": pair.draft.info.__dict__,
                }
            )
        )
    else:
        print()
        print(stats_line(turn.record(), markdown=False), file=sys.stderr)
    return 0


def cmd_desktop(args) -> int:
    from .desktop import run

    return run(_settings(args), browser=args.browser)


def cmd_serve(args) -> int:
    from .ui import serve

    settings = _settings(args)
    return serve(settings)


def cmd_bench(args) -> int:
    from .bench import run_bench

    settings = _settings(args)
    return run_bench(settings, args)


def cmd_prepare(args) -> int:
    from .kernels import cpu_kernels, rival_variants
    from .models import ensure_embedded_model

    started = time.perf_counter()
    print(f"embedded model: {ensure_embedded_model()}", file=sys.stderr)
    kernels = cpu_kernels()
    # The rival variant too: the app times it against the best at every load (chatapp.llama.from_hf).
    built = (
        [kernels.variant()] + [v for v in rival_variants(kernels.variant()) if cpu_kernels(v) is not None]
        if kernels
        else []
    )
    print(
        f"CPU kernels: {', '.join(built) + ' ready' if built else 'unavailable (torch ops fallback)'}", file=sys.stderr
    )
    print(f"prepared in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


COMMANDS = {
    "desktop": cmd_desktop,
    "serve": cmd_serve,
    "generate": cmd_generate,
    "bench": cmd_bench,
    "prepare": cmd_prepare,
}


def keep_freed_memory() -> bool:
    """Ask glibc malloc to reuse freed blocks up to 32 MB instead of returning
    them to the system. Its default maps each block over 128 KB afresh (a
    logits tensor of a few rows over a 49k vocabulary) and pays the page
    faults every time: a 5-row softmax took 0.8-0.9 ms instead of 0.15 ms.
    Whole-process setting, so only the app's entry point calls it."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))


SERVE_ONLY_FLAGS = ("--host", "--share", "--no-browser", "--openai-api")


def _default_command(flags: list[str]) -> str:
    """`desktop`, unless a flag asks for what only `serve` does (serving on the network, no browser)."""
    return "serve" if any(flag.split("=")[0] in SERVE_ONLY_FLAGS for flag in flags) else "desktop"


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = [_default_command(argv), *argv]
    args = build_parser().parse_args(argv)
    from .models import ModelLoadError

    try:
        return COMMANDS[args.command](args)
    except (SettingsError, ModelLoadError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory loading or running the model; try a smaller model", file=sys.stderr)
        return 1
