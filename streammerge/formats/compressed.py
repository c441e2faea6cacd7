"""compressed-tensors ``float-quantized`` FP8 checkpoints (llm-compressor, RedHatAI ``-FP8`` repos).

``config.quantization_config = {quant_method: "compressed-tensors", format: "float-quantized",
config_groups: {name: {targets, weights: {num_bits: 8, type: "float", strategy, block_structure, …},
input_activations}}, ignore: [...]}``. On disk a quantized Linear holds ``weight`` F8_E4M3 and
``weight_scale`` in the scale's own dtype: per tensor ``(1,)``, per channel ``(out, 1)`` or per block
``(⌈out/b0⌉, ⌈in/b1⌉)``; ``input_scale`` (static activations) is an ordinary tensor here, copied as is.
Modules in ``ignore`` are stored unquantized and need nothing.

compressed-tensors dequantizes with ``q.to(scale.dtype) * scale`` (its ``_dequantize``), a loader then casts
to the model dtype: ``QuantScheme.product_dtype`` is the scale dtype. The strategy of each weight is
read from its scale's shape and must be one a config group declares. Pure: the codec is
``streammerge.formats.fp8``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from streammerge.errors import CheckpointError
from streammerge.formats.base import ACTIVATION_SCALES, CODES, SCALE, QuantIndex, QuantizedWeight, QuantScheme, grid
from streammerge.formats.blockfp8 import check_scale, fp8_rows, fp8_scale

if TYPE_CHECKING:
    from streammerge.formats.safetensors import TensorInfo

METHOD = "compressed-tensors"
FLOAT_QUANTIZED = "float-quantized"
SCALE_SUFFIX = "_scale"
#: The scale of an all-zero cell: compressed-tensors replaces 0 by the scale dtype's eps.
_EPS = {"BF16": 2.0**-7, "F16": 2.0**-10, "F32": 2.0**-23}


def formats_of(qc: Mapping[str, object]) -> set[str]:
    """The compression formats a compressed-tensors config declares (top level and per group)."""
    out = {qc["format"]} if isinstance(qc.get("format"), str) else set()
    groups = qc.get("config_groups")
    if isinstance(groups, dict):
        out |= {g["format"] for g in groups.values() if isinstance(g, dict) and isinstance(g.get("format"), str)}
    return out


class CompressedFP8:
    name = "compressed-fp8"
    rows = staticmethod(fp8_rows)

    def claims(self, qc: Mapping[str, object]) -> bool:
        return qc.get("quant_method") == METHOD and formats_of(qc) == {FLOAT_QUANTIZED}

    def index(self, qc: Mapping[str, object], tensors: Mapping[str, TensorInfo], where: str) -> QuantIndex:
        blocks = _declared(qc, where)  # strategy -> block structure (None unless "block")
        weights: dict[str, QuantizedWeight] = {}
        for name, t in tensors.items():
            if name.endswith(".weight_zero_point"):
                raise CheckpointError(
                    f"{where}: tensor {name!r} is a zero point: asymmetric FP8 is not supported; "
                    "merge into the 16-bit base instead"
                )
            if name.endswith(".weight" + SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) not in tensors:
                raise CheckpointError(
                    f"{where}: tensor {name!r} is a weight scale but its weight {name.removesuffix(SCALE_SUFFIX)!r} "
                    "is in no shard; the checkpoint is incomplete: re-download it"
                )
            if t.dtype != "F8_E4M3":
                continue
            scale = fp8_scale(tensors, name, SCALE_SUFFIX, where)
            strategy, block = _strategy(name, t.shape, scale, blocks, where)
            scheme = QuantScheme(self.name, strategy, block, scale.dtype, scale.dtype, _EPS.get(scale.dtype, 0.0))
            weights[name] = QuantizedWeight(name, t.shape, ((CODES, name), (SCALE, scale.name)), scheme)
        extras = tuple(sorted(n for n in tensors if n.endswith(ACTIVATION_SCALES)))
        return QuantIndex(self.name, MappingProxyType(weights), MappingProxyType(dict(qc)), extras)

    def output_config(
        self, qc: Mapping[str, object], dequantized: bool, touched: frozenset[str]
    ) -> dict[str, object] | None:
        return None if dequantized else dict(qc)


def _declared(qc: Mapping[str, object], where: str) -> dict[str, tuple[int, int] | None]:
    """strategy → block structure for every config group's weights; refuse what is not FP8."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{where}: quantization_config has no config_groups; fix config.json")
    out: dict[str, tuple[int, int] | None] = {}
    for gname, group in groups.items():
        w = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(w, dict):
            continue  # activation-only group: no weight is quantized by it
        if w.get("num_bits") != 8 or w.get("type") != "float" or w.get("symmetric") is False:
            raise CheckpointError(
                f"{where}: config group {gname!r} quantizes weights to {w.get('num_bits')}-bit {w.get('type')} "
                f"(symmetric={w.get('symmetric')}); streammerge merges into symmetric FP8 float-quantized weights "
                "only: merge into the 16-bit base instead"
            )
        strategy = w.get("strategy")
        if strategy not in ("tensor", "channel", "block"):
            raise CheckpointError(
                f"{where}: config group {gname!r} uses weight strategy {strategy!r}; streammerge reads FP8 "
                "tensor, channel and block scales: merge into the 16-bit base instead"
            )
        bs = w.get("block_structure")
        if strategy == "block" and not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(v, int) and v > 0
                                                                                       for v in bs)):
            raise CheckpointError(
                f"{where}: config group {gname!r} has block strategy but block_structure {bs!r}; fix config.json"
            )
        out[strategy] = (bs[0], bs[1]) if strategy == "block" else None
    return out


def _strategy(
    name: str, shape: tuple[int, ...], scale: TensorInfo, declared: Mapping[str, tuple[int, int] | None], where: str
) -> tuple[str, tuple[int, int]]:
    """The declared strategy whose scale shape ``scale`` has; else refuse naming the scale."""
    if len(shape) == 2:
        rows, cols = shape
        for strategy, block in declared.items():
            cell = {"tensor": (rows, cols), "channel": (1, cols)}.get(strategy) or block
            assert cell is not None
            want = {"block": grid((rows, cols), cell), "channel": (rows, 1)}.get(strategy)
            if (want is not None and scale.shape == want) or (strategy == "tensor" and scale.shape in ((), (1,))):
                check_scale(name, shape, scale, strategy, cell, where)  # its dtype
                return strategy, cell
    strategy = next(iter(declared), "tensor")
    check_scale(name, shape, scale, strategy, declared.get(strategy) or (1, 1), where)
    raise CheckpointError(f"{where}: scale {scale.name!r} fits no declared strategy")  # pragma: no cover
