"""Command line: ``python -m streammerge {merge,unmerge,verify,demo} ...``. The only module that prints.

Exit status: 0 success, 1 ``verify`` found a problem, 2 bad input or environment (one ``error: …`` line on stderr, no
traceback), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Unexpected exceptions keep their
traceback: they are bugs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from streammerge import __version__
from streammerge.errors import StreamMergeError

LOG = logging.getLogger("streammerge")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``5GB`` → 5·10⁹ bytes (HF convention), ``512MiB`` → 512·2²⁰, ``1000`` → 1000."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 5GB, 512MB, 1GiB or a byte count")
    value = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least one byte")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streammerge",
        description="Fold PEFT LoRA adapters into a safetensors checkpoint, streaming, in bounded memory.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("merge", help="merge adapter(s) into a base checkpoint and write a new checkpoint")
    m.add_argument("--base", help="base checkpoint directory or .safetensors file "
                   "(default: base_model_name_or_path of the adapter, local or in the HF cache)")
    m.add_argument("--adapter", action="append", metavar="DIR",
                   help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors); with --resume and "
                   "no inputs, the inputs and options --out recorded are used")
    _subfolder_arg(m)
    _output_args(m)
    m.add_argument("--dequantize", action="store_true",
                   help="quantized base (FP8, MXFP4, bitsandbytes, GPTQ, AWQ): write every quantized weight in the "
                   "config's torch_dtype and drop quantization_config; default keeps the format (FP8: merged weights "
                   "re-quantized with fresh scales; MXFP4: touched experts in torch_dtype; bitsandbytes/GPTQ/AWQ "
                   "need --dequantize)")
    _combination_args(m)
    _common(m)

    u = sub.add_parser("unmerge", help="take an adapter back out of a merged checkpoint: W - w*s*B@A, one rounding")
    u.add_argument("--merged", required=True, metavar="DIR", help="the merged checkpoint directory")
    u.add_argument("--adapter", required=True, metavar="DIR", help="the PEFT adapter that was merged into it")
    u.add_argument("--weight", type=float, default=1.0, metavar="W", help="weight it was merged with (default 1)")
    u.add_argument("--base", metavar="DIR", help="the original base: source of tensors that have no exact inverse "
                   "(saved heads, modules_to_save, DoRA, trainable tokens)")
    _output_args(u)
    _common(u)
    v = sub.add_parser("verify", help="check a merged directory against its recorded inputs; exit 0 good, 1 not")
    v.add_argument("--out", required=True, metavar="DIR", help="the merged directory to check")
    v.add_argument("--base", help="base checkpoint directory (default: the one streammerge.json records)")
    v.add_argument("--adapter", action="append", metavar="DIR",
                   help="the adapter(s) that were merged (default: those streammerge.json records)")
    v.add_argument("--adapter-name", metavar="NAME", help="adapter sub-directory (default: the recorded one)")
    _subfolder_arg(v)
    v.add_argument("--against-base", action="store_true",
                   help="fail when a tensor the adapter targets equals the base bit for bit (the merge did nothing)")
    v.add_argument("--sample", type=int, metavar="N",
                   help="recompute at least N rows per merged tensor (whole 64-row blocks) instead of all rows")
    v.add_argument("--device", default=None,
                   help="device for the recomputation (default: the recorded device class when available, else cpu)")
    v.add_argument("--workers", type=int, metavar="N", help="compute threads (default: min(4, cores))")
    _common(v)

    d = sub.add_parser("demo", help="build a tiny base + adapter in a temporary directory, merge, verify")
    d.add_argument("--keep", metavar="DIR", help="build the demo in DIR and keep it (default: a temp dir)")
    _common(d)
    return parser


def parse_weights(text: str) -> list[float]:
    """``0.7,0.3`` → [0.7, 0.3] (negative weights allowed: ``1,-0.5``)."""
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers (e.g. 0.7,0.3)") from None


def _output_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that write a checkpoint (merge, unmerge)."""
    p.add_argument("--adapter-name", metavar="NAME", help="adapter sub-directory to use when DIR holds several")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, or cuda[:N] (default: auto)")
    p.add_argument("--workers", type=int, metavar="N", help="compute threads (default: min(4, cores))")
    p.add_argument("--max-shard-size", type=parse_size, metavar="SIZE",
                   help="re-shard the output (e.g. 5GB); default keeps the input's shard layout")
    p.add_argument("--max-memory", type=parse_size, metavar="SIZE", default=None,
                   help="working-memory budget for merge blocks (default 512MiB); RSS ≈ 250 MB + this")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into --out: keep shards whose recorded inputs, options and "
                   "checksum still match, recompute the rest (same bytes as an uninterrupted run)")
    p.add_argument("--allow-nonfinite", action="store_true", help="write NaN/inf results instead of stopping")
    p.add_argument("--checksum", choices=("xxh3", "sha256"), default=None,
                   help="digest of each output file in streammerge.json: xxh3 (XXH3-128, fast; the default) or "
                   "sha256 (what sha256sum and the Hub show; ~1.7 GB/s on one core); --resume keeps the one the "
                   "directory's records use")


def _combination_args(m: argparse.ArgumentParser) -> None:
    from streammerge.plan import COMBINATIONS

    m.add_argument("--weights", type=parse_weights, metavar="W1,W2,...",
                   help="one weight per --adapter, in order (default 1 each); negative weights subtract")
    m.add_argument("--combination", choices=COMBINATIONS, default=None,
                   help="how several adapters combine: cat (default; exact sum of weighted LoRA deltas, one "
                   "rounding), or a task-vector operator per tensor: ties, dare_linear, dare_ties, magnitude_prune")
    m.add_argument("--density", type=float, metavar="D",
                   help="fraction of each adapter's delta kept by ties/dare/magnitude_prune (required for them)")
    m.add_argument("--seed", type=int, default=0, help="DARE mask seed (default 0); same seed, same result")
    m.add_argument("--heads-from", metavar="NAME",
                   help="adapter (directory name or index) whose saved heads/full tensors to keep when several "
                   "adapters carry one; heads are never blended")
    m.add_argument("--pattern-rules", choices=("current", "0.14", "pre-0.14"), default="current",
                   help="how rank_pattern/alpha_pattern keys match module names: 'current' as PEFT >= 0.15 "
                   "(what PEFT 0.21 applies to every adapter; default), or the rules of older PEFT versions")


def _subfolder_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-subfolder", metavar="NAME", help="the model inside a multi-model base repository "
                   "(e.g. text_encoder, transformer); verify defaults to the one the merge recorded")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors; no progress bar")


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so cleanup runs as it does for Ctrl-C."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. main() called from a worker in tests)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_STOPPED = "no partial shard was left under a final name; rerun the same command with --resume to continue"


@contextmanager
def _logging(level: int) -> Iterator[None]:
    """Route the library's log records to stderr for this call only (the root logger is left alone)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    previous = LOG.level, LOG.propagate
    LOG.addHandler(handler)
    LOG.setLevel(level)
    LOG.propagate = False
    try:
        yield
    finally:
        LOG.removeHandler(handler)
        LOG.setLevel(previous[0])
        LOG.propagate = previous[1]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    try:
        with _sigterm_raises(), _logging(level):
            return _run(args)
    except StreamMergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {_STOPPED}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"terminated: {_STOPPED}", file=sys.stderr)
        return 143


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from streammerge.demo import run_demo

        report = run_demo(args.keep)
        print(report)
        return 0
    if args.command == "verify":
        return _verify(args)
    return _merge(args)


def _verify(args: argparse.Namespace) -> int:
    from streammerge import changes
    from streammerge.verify import verify

    report = verify(out=args.out, base=args.base, adapters=args.adapter or (), adapter_name=args.adapter_name,
                    sample=args.sample, device=args.device, workers=args.workers, base_subfolder=args.base_subfolder,
                    against_base=args.against_base)
    print(report.summary())
    if not args.quiet:
        print("\n".join(changes.summary_lines(report.changes, every=args.verbose)))
    return 0 if report.ok else 1


def _merge(args: argparse.Namespace) -> int:
    # No torch here: it is imported when the first block is computed, so errors found while planning
    # return at once, and the raw copies start while torch loads (``streammerge.scatter``).
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from streammerge import changes
    from streammerge.api import DEFAULT_MAX_MEMORY, merge, unmerge
    from streammerge.budget import default_workers

    workers = default_workers() if args.workers is None else args.workers
    if workers < 1:
        raise StreamMergeError(f"--workers {workers}: must be at least 1")
    # Each worker runs torch ops; split the cores between them instead of oversubscribing.
    threads = max(1, (os.cpu_count() or 1) // workers)
    plan_holder = []
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, disable=True if args.quiet else None,
               desc="merging", file=sys.stderr)

    def on_plan(plan: object) -> None:
        plan_holder.append(plan)
        bar.total = plan.total_bytes  # type: ignore[attr-defined]
        if args.dry_run:
            print(plan.summary())  # type: ignore[attr-defined]

    with logging_redirect_tqdm(), bar:
        common = dict(
            adapter_name=args.adapter_name, device=args.device, workers=workers, max_shard_size=args.max_shard_size,
            max_memory=args.max_memory or DEFAULT_MAX_MEMORY, dry_run=args.dry_run, overwrite=args.overwrite,
            allow_nonfinite=args.allow_nonfinite, on_progress=bar.update, on_plan=on_plan, resume=args.resume,
            checksum=args.checksum, threads=threads,
        )
        if args.command == "unmerge":
            report = unmerge(args.merged, args.adapter, args.out, weight=args.weight, base=args.base, **common)
        else:
            report = merge(
                base=args.base, adapters=args.adapter or (), out=args.out, weights=args.weights,
                combination=args.combination, density=args.density, seed=args.seed, heads_from=args.heads_from,
                pattern_rules=args.pattern_rules, base_subfolder=args.base_subfolder, dequantize=args.dequantize,
                **common,
            )
    if not args.quiet or args.dry_run:
        print(report.summary())
    if not args.quiet and not args.dry_run:
        print("\n".join(changes.summary_lines(report.changes, every=args.verbose)))
    return 0


def entrypoint() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
