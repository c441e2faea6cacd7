"""The command line's arguments: the parser, value checks (sizes, weights, devices), "did you mean"
suggestions for misspelled flags, and the map from library argument names to flags (``flag_for``).

Imports no torch: parsing (and any argument error, exit 2) happens before the heavy imports.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from streammerge import __version__
from streammerge.sizes import parse_size as _parse_size

#: Library argument names whose flag is not ``--`` + the name with dashes.
_ALIASES = {"adapters": "adapter"}


def parse_size(text: str) -> int:
    try:
        return _parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_weights(text: str) -> list[float]:
    """``0.7,0.3`` → [0.7, 0.3] (negative weights allowed: ``1,-0.5``)."""
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers (e.g. 0.7,0.3)") from None


def parse_device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (checked for availability later, once torch is imported)."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors suggest the closest flag for each unknown one (``--ouput`` → ``--out``)."""

    argv: Sequence[str] = ()
    commands: Mapping[str, argparse.ArgumentParser] = MappingProxyType({})

    def error(self, message: str) -> None:  # type: ignore[override]
        super().error(message + _suggestions(self._for_suggestions(), self.argv))

    def _for_suggestions(self) -> argparse.ArgumentParser:
        """This parser, or (at the top level) the subcommand's parser named on the command line."""
        if self.commands:
            for word in self.argv:
                if word in self.commands:
                    return self.commands[word]
        return self


def _suggestions(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str:
    known = [s for s in parser._option_string_actions if s.startswith("--")]
    hints = []
    for word in argv:
        flag = word.split("=", 1)[0]
        if not flag.startswith("--") or flag in parser._option_string_actions:
            continue
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        if close:
            hints.append(f"{close[0]} (not {flag})")
    return f"; did you mean {', '.join(hints)}?" if hints else ""


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; ``argv`` is only used to suggest flags in error messages."""
    from streammerge.plan import COMBINATIONS

    def make(parent: argparse._SubParsersAction | None, name: str, **kw) -> argparse.ArgumentParser:
        p = parent.add_parser(name, allow_abbrev=False, **kw) if parent else _Parser(allow_abbrev=False, **kw)
        p.argv = argv  # type: ignore[attr-defined]
        return p

    parser = make(None, "", prog="streammerge",
                  description="Fold PEFT LoRA adapters into a safetensors checkpoint, streaming, in bounded memory.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    m = make(sub, "merge", help="merge adapter(s) into a base checkpoint and write a new checkpoint")
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
    _split_args(m)
    _common(m)

    u = make(sub, "unmerge", help="take an adapter back out of a merged checkpoint: W - w*s*B@A, one rounding")
    u.add_argument("--merged", required=True, metavar="DIR", help="the merged checkpoint directory")
    u.add_argument("--adapter", required=True, metavar="DIR", help="the PEFT adapter that was merged into it")
    u.add_argument("--weight", type=float, default=None, metavar="W",
                   help="weight it was merged with (default: the weight the merged manifest records, else 1)")
    u.add_argument("--force", action="store_true", help="unmerge even when the merged manifest records other "
                   "adapters or another weight (the output's manifest records the warning)")
    u.add_argument("--base", metavar="DIR", help="the original base: source of tensors that have no exact inverse "
                   "(saved heads, modules_to_save, DoRA, trainable tokens)")
    _output_args(u)
    _common(u)

    v = make(sub, "verify", help="check a merged directory against its recorded inputs; exit 0 good, 1 not")
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
    v.add_argument("--device", type=parse_device, default=None,
                   help="device for the recomputation: auto, cpu, cuda or cuda:N (default: the recorded device class "
                   "when available, else cpu)")
    v.add_argument("--workers", type=int, metavar="N", help="compute threads (default: min(4, cores))")
    _common(v)

    f = make(sub, "finalize", help="seal an --out written by `merge --part I/N` runs: check every shard, "
             "then write index, config and manifest (exit 2 naming missing or stale shards)")
    f.add_argument("--out", required=True, metavar="DIR", help="the output directory the parts wrote")
    _common(f)

    d = make(sub, "demo", help="build a tiny base + adapter in a temporary directory, merge, verify")
    d.add_argument("--keep", metavar="DIR", help="build the demo in DIR (new or empty) and keep it "
                   "(default: a temporary directory)")
    _common(d)
    parser.commands = dict(sub.choices)  # type: ignore[attr-defined]
    return parser


def _output_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that write a checkpoint (merge, unmerge)."""
    p.add_argument("--adapter-name", metavar="NAME", help="adapter sub-directory to use when DIR holds several")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty; see --resume, "
                   "--overwrite)")
    p.add_argument("--device", type=parse_device, default="auto",
                   help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--workers", type=int, metavar="N", help="compute threads (default: min(4, cores))")
    p.add_argument("--max-shard-size", type=parse_size, metavar="SIZE",
                   help="re-shard the output (e.g. 5GB); default keeps the input's shard layout")
    p.add_argument("--max-memory", type=parse_size, metavar="SIZE", default=None,
                   help="working-memory budget for merge blocks (default 512MB); RSS ≈ 250 MB + this")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier streammerge output in --out (only files streammerge wrote are deleted; "
                   "any other file there stops the command)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into --out: keep shards whose recorded inputs, options and "
                   "checksum still match, recompute the rest (same bytes as an uninterrupted run); a complete "
                   "output of other inputs or options is refused unless --overwrite is given too")
    p.add_argument("--allow-nonfinite", action="store_true", help="write NaN/inf results instead of stopping")
    p.add_argument("--checksum", choices=("xxh3", "sha256"), default=None,
                   help="digest of each output file in streammerge.json: xxh3 (XXH3-128, fast; the default) or "
                   "sha256 (what sha256sum and the Hub show; ~1.7 GB/s on one core); --resume keeps the one the "
                   "directory's records use")
    p.add_argument("--buffered-io", action="store_true",
                   help="write through the page cache instead of direct I/O (the output then stays cached for a "
                   "load right after, at the cost of copying it there); same bytes")


def _split_args(m: argparse.ArgumentParser) -> None:
    m.add_argument("--part", metavar="I/N",
                   help="write only the output shards of part I of N (0 <= I < N) into the shared --out; run every "
                   "part (any machines), then `streammerge finalize --out DIR`. Default in a Slurm array job: "
                   "SLURM_ARRAY_TASK_ID/COUNT (minus SLURM_ARRAY_TASK_MIN); --part all: one process, ignoring Slurm")
    m.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the parts as Ray tasks (pip install 'streammerge[ray]'), then finalize; ADDRESS for "
                   "ray.init ('auto' joins a running cluster; none: start or reuse a local one). Needs shared storage")
    m.add_argument("--parts", type=int, metavar="N", help="with --ray: number of parts (default: one per task slot)")


def _subfolder_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-subfolder", metavar="NAME", help="the model inside a multi-model base repository "
                   "(e.g. text_encoder, transformer); verify defaults to the one the merge recorded")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log details: the resolved base, every targeted tensor with its scale; all problems")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors; no progress bar")


_FLAGS: dict[str | None, set[str]] = {}


def flag_for(command: str | None, name: str) -> str | None:
    """The flag of ``command`` that sets the library argument ``name`` (``max_memory`` → ``--max-memory``),
    or None when the command has none (the message then keeps the library name)."""
    if command not in _FLAGS:
        parser = build_parser()
        for cmd, sub in parser.commands.items():  # type: ignore[attr-defined]
            _FLAGS[cmd] = {s for s in sub._option_string_actions if s.startswith("--")}
        _FLAGS[None] = {s for p in parser.commands.values() for s in p._option_string_actions  # type: ignore
                        if s.startswith("--")}
    flag = "--" + _ALIASES.get(name, name).replace("_", "-")
    return flag if flag in _FLAGS.get(command, _FLAGS[None]) else None
