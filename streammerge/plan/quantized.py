"""Tasks for a quantized base (``Checkpoint.quant``): which stored tensors are decoded, re-encoded or copied. Pure.

Two modes (``PlanOptions.dequantize``):

* ``--dequantize``: every quantized weight is decoded to the model dtype (``config.json`` ``torch_dtype``,
  bf16 when unset) and merged there, exactly as a loader that dequantizes and PEFT's merge would do; its
  companions (scales) and static activation scales are dropped and ``quantization_config`` is removed from the
  output config: a plain checkpoint, as transformers' dequantizing load + ``save_pretrained`` writes it.
* keep the format (default): untouched weights and their companions are raw copies (byte-identical). A weight
  the adapter touches is decoded, merged in the model dtype, and encoded back in the base's own scheme with
  fresh scales; each of its companions becomes a ``rescale`` task that walks the same merged row blocks.
  ``quantization_config`` is kept (``BaseFormat.output_config``).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from streammerge.errors import PlanError
from streammerge.formats import registry
from streammerge.formats.base import CODES, QuantIndex, QuantizedWeight
from streammerge.formats.refs import TensorRef
from streammerge.formats.safetensors import TensorInfo
from streammerge.plan.types import QuantSource, TensorTask


@dataclass(frozen=True, slots=True)
class QuantSummary:
    """The base's quantization as the plan treats it (for ``--dry-run`` and the report)."""

    format: str  # registry name, e.g. "fp8-block"
    dequantize: bool
    stored: tuple[str, ...]  # every quantized stored tensor of the base (codes, companions, activation scales)

    def counts(self, tasks: tuple[TensorTask, ...]) -> dict[str, int]:
        """Quantized stored tensors dequantized / re-quantized / copied raw / dropped (companions of a decode)."""
        stored = set(self.stored)
        out = dict.fromkeys(("dequantized", "re-quantized", "copied", "dropped"), 0)
        seen = set()
        for t in tasks:
            if t.quant is not None:
                out["re-quantized" if t.quant.encode else "dequantized"] += 1
            elif t.name in stored and t.is_raw_copy:
                out["copied"] += 1
            seen.add(t.name)
        out["dropped"] = len(stored - seen)
        return out

    def line(self, tasks: tuple[TensorTask, ...]) -> str:
        c = self.counts(tasks)
        mode = "dequantize" if self.dequantize else "keep the format"
        return (f"quantized base ({self.format}, {mode}): {c['dequantized']} tensors dequantized, "
                f"{c['re-quantized']} re-quantized (weights and fresh scales), {c['copied']} copied raw, "
                f"{c['dropped']} scales dropped")


_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
QUANT_KEY = "quantization_config"


def compute_dtype(config: Mapping[str, object]) -> str:
    """The dtype quantized weights decode to: config ``torch_dtype`` (or transformers 5's ``dtype``), else bf16."""
    name = config.get("torch_dtype") or config.get("dtype")
    return _DTYPES.get(name, "BF16") if isinstance(name, str) else "BF16"


def is_logical(qw: QuantizedWeight, located: Mapping[str, tuple[int, TensorInfo]]) -> bool:
    """True when the weight is not stored under its own name and shape (GPTQ ``qweight``, MXFP4 ``_blocks``,
    bitsandbytes' packed bytes): the planner then targets a logical slot, and the codes keep their own name."""
    codes = located.get(qw.part(CODES))
    return qw.name != qw.part(CODES) or codes is None or codes[1].shape != qw.shape


def logical_slots(
    quant: QuantIndex, config: Mapping[str, object], located: Mapping[str, tuple[int, TensorInfo]]
) -> dict[str, tuple[int, TensorInfo]]:
    """The slot each logically-named quantized weight has for planning: its logical name and shape in the
    compute dtype, in its codes' shard at its codes' offsets (never read: a ``QuantSource`` reads the parts)."""
    dtype = compute_dtype(config)
    out = {}
    for qw in quant.weights.values():
        if is_logical(qw, located):
            shard, codes = located[qw.part(CODES)]
            out[qw.name] = (shard, TensorInfo(qw.name, dtype, qw.shape, codes.begin, codes.end))
    return out


def apply_quantization(
    quant: QuantIndex,
    config: Mapping[str, object],
    tasks: MutableMapping[str, TensorTask],
    stored: Mapping[str, TensorRef],
    dequantize: bool,
) -> tuple[set[str], tuple[tuple[str, object], ...], tuple[str, ...], QuantSummary]:
    """Rewrite ``tasks`` (by name, in place) for a quantized base.

    ``stored`` maps stored tensor names to their refs. A weight whose logical slot differs from its codes
    (``is_logical``) is written, when decoded, under its logical name in its codes' place. Keeping the format,
    a touched weight of a format that cannot re-encode it (``scheme.reencodable`` False) is written decoded
    when the format can declare it unquantized (``written_together``: MXFP4's ``modules_to_not_convert``),
    else refused. Returns the stored tensors to drop, the config updates and the config keys to remove
    (from ``BaseFormat.output_config``), and the summary ``--dry-run`` prints.

    Raises:
        PlanError: an adapter replaces a quantized weight with a full tensor (``modules_to_save``), changes a
            weight its format cannot re-encode nor declare (without ``dequantize``), or the format cannot be
            kept at all (``output_config`` refuses: bitsandbytes, GPTQ, AWQ).
    """
    dtype = compute_dtype(config)
    decoded = _decoded(quant, tasks, dequantize, dtype)
    drop: set[str] = set()
    touched: set[str] = set()  # re-encoded in the base's scheme
    names: list[str] = []
    for qw in quant.weights.values():
        names += [name for _, name in qw.parts]
        codes = qw.part(CODES)
        logical = qw.name != codes or stored[codes].shape != qw.shape
        task = tasks[qw.name]
        if task.source.name not in (codes, qw.name) or (logical and task.source.shape != qw.shape):
            raise PlanError(
                f"the adapter replaces quantized weight {qw.name!r} with a full tensor; streammerge merges deltas "
                "into quantized weights only: merge into the 16-bit base instead"
            )
        parts = tuple((role, stored[name]) for role, name in qw.parts)
        if logical and qw.name != codes:
            del tasks[qw.name]  # decoded: written in its codes' place under its own name; kept: parts copied raw
        if qw.name in decoded:
            kind = "merge" if task.steps else "dequantize"
            tasks[codes] = TensorTask(qw.name, dtype, qw.shape, task.source, task.steps, kind,
                                      QuantSource(qw, parts, dtype, encode=False))
            drop.update(qw.companions)
        elif task.steps and not logical:  # re-encodable (``_decoded`` took or refused the others)
            touched.add(qw.name)
            tasks[qw.name] = TensorTask(qw.name, task.dtype, task.shape, task.source, task.steps, "merge",
                                        QuantSource(qw, parts, dtype, encode=True))
            for role, name in qw.parts:
                if role != CODES:
                    part = stored[name]
                    tasks[name] = TensorTask(name, part.dtype, part.shape, task.source, task.steps, "rescale",
                                             QuantSource(qw, parts, dtype, encode=True, role=role))
    if dequantize:
        drop.update(quant.extras)
    names += quant.extras
    for name in drop:
        del tasks[name]
    qc = registry.format_named(quant.format).output_config(quant.config, dequantize, frozenset(decoded | touched))
    updates: tuple[tuple[str, object], ...] = ()
    removals: tuple[str, ...] = ()
    if qc is None:
        removals = (QUANT_KEY,)
    elif qc != dict(quant.config):
        updates = ((QUANT_KEY, qc),)
    return drop, updates, removals, QuantSummary(quant.format, dequantize, tuple(names))


def _decoded(quant: QuantIndex, tasks: Mapping[str, TensorTask], dequantize: bool, dtype: str) -> set[str]:
    """The weights written decoded (all with ``dequantize``; else the touched ones a format cannot re-encode,
    with the weights ``written_together`` with them)."""
    if dequantize:
        return set(quant.weights)
    fmt = registry.format_named(quant.format)
    together = getattr(fmt, "written_together", None)
    decoded: set[str] = set()
    for qw in quant.weights.values():
        if tasks[qw.name].steps and not qw.scheme.reencodable:
            if together is None:
                fmt.output_config(quant.config, False, frozenset())  # a format that cannot be kept says so first
                raise PlanError(
                    f"the adapter changes quantized weight {qw.name!r}, which streammerge cannot write back in its "
                    f"{qw.scheme.format} format; pass --dequantize to write the merged checkpoint in {dtype}"
                )
            decoded.update(together(quant, qw.name))
    return decoded


def advice(quant: QuantIndex, dequantize: bool) -> list[str]:
    """The warning a dequantized merge of a format that cannot be re-encoded deserves (its rounding stays)."""
    if not dequantize or all(qw.scheme.reencodable for qw in quant.weights.values()):
        return []
    return [
        f"the base is {quant.format}-quantized: the merge is exact on its dequantized weights, but their "
        "quantization error stays in the output; if you have the 16-bit model it was quantized from, merging "
        "into that is better: pass its directory as --base (the adapter's base_model_name_or_path often names it)"
    ]
