"""Block FP8 checkpoints (DeepSeek-V3/R1, Kimi K2, transformers ``FineGrainedFP8Config``): the layout. Pure.

``config.quantization_config = {quant_method: "fp8", weight_block_size: [b0, b1], …}``; each quantized
Linear stores ``<m>.weight`` F8_E4M3 (out, in) and ``<m>.weight_scale_inv`` (F32) (⌈out/b0⌉, ⌈in/b1⌉), possibly
in another shard. Decoding and encoding are ``streammerge.formats.fp8`` (the codec, torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from streammerge.errors import CheckpointError
from streammerge.formats.base import ACTIVATION_SCALES, CODES, SCALE, QuantIndex, QuantizedWeight, QuantScheme, grid

if TYPE_CHECKING:
    from streammerge.formats.safetensors import TensorInfo

SCALE_INV_SUFFIX = "_scale_inv"
#: Scale dtypes the FP8 codec reads.
SCALE_DTYPES = frozenset({"F32", "BF16", "F16"})


def fp8_rows(qw: QuantizedWeight, role: str, r0: int, r1: int) -> tuple[int, int]:
    """Rows of part ``role`` that hold weight rows ``[r0, r1)`` (``BaseFormat.rows`` of the FP8 formats)."""
    if role == CODES:
        return r0, r1
    if qw.scheme.strategy == "tensor":
        return 0, 1  # one cell; stored () / (1,) / (1, 1): the executor reads it whole
    b0 = qw.scheme.block[0]
    return r0 // b0, -(-r1 // b0)


class BlockFP8:
    """DeepSeek-V3 / transformers ``FineGrainedFP8Config`` checkpoints."""

    name = "fp8-block"
    rows = staticmethod(fp8_rows)

    def claims(self, qc: Mapping[str, object]) -> bool:
        return qc.get("quant_method") == "fp8"

    def index(self, qc: Mapping[str, object], tensors: Mapping[str, TensorInfo], where: str) -> QuantIndex:
        block = _block_size(qc.get("weight_block_size", [128, 128]), where)
        pow2 = qc.get("scale_fmt") == "ue8m0"  # DeepSeek-V3.1: every scale a power of two
        weights: dict[str, QuantizedWeight] = {}
        for name, t in tensors.items():
            if name.endswith(SCALE_INV_SUFFIX):
                owner = name.removesuffix(SCALE_INV_SUFFIX)
                if owner not in tensors:
                    raise CheckpointError(
                        f"{where}: tensor {name!r} is a block-FP8 scale but its weight {owner!r} is in no shard; "
                        "the checkpoint is incomplete: re-download it"
                    )
                continue
            if t.dtype != "F8_E4M3":
                continue
            scale = fp8_scale(tensors, name, SCALE_INV_SUFFIX, where)
            check_scale(name, t.shape, scale, "block", block, where)
            scheme = QuantScheme(self.name, "block", block, scale.dtype, "F32", 1.0, pow2)
            weights[name] = QuantizedWeight(name, t.shape, ((CODES, name), (SCALE, scale.name)), scheme)
        extras = tuple(sorted(n for n in tensors if n.endswith(ACTIVATION_SCALES)))
        return QuantIndex(self.name, MappingProxyType(weights), MappingProxyType(dict(qc)), extras)

    def output_config(
        self, qc: Mapping[str, object], dequantized: bool, touched: frozenset[str]
    ) -> dict[str, object] | None:
        return None if dequantized else dict(qc)


def _block_size(value: object, where: str) -> tuple[int, int]:
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return (value[0], value[1])
    raise CheckpointError(
        f"{where}: quantization_config.weight_block_size is {value!r}, not two positive integers; fix config.json"
    )


def fp8_scale(tensors: Mapping[str, TensorInfo], weight: str, suffix: str, where: str) -> TensorInfo:
    """The scale tensor ``weight + suffix`` of an F8_E4M3 weight, from any shard; refused when absent."""
    scale = tensors.get(weight + suffix)
    if scale is None:
        raise CheckpointError(
            f"{where}: FP8 tensor {weight!r} has no {weight + suffix!r} in any shard; without its "
            "scale it cannot be dequantized: the checkpoint is incomplete, re-download it"
        )
    return scale


def check_scale(
    weight: str, shape: tuple[int, ...], scale: TensorInfo, strategy: str, block: tuple[int, int], where: str
) -> None:
    """Refuse a scale whose dtype or shape does not fit ``weight`` under ``strategy`` (one line, named)."""
    if len(shape) != 2:
        raise CheckpointError(
            f"{where}: FP8 tensor {weight!r} has shape {list(shape)}; only 2-D FP8 weights are supported "
            "(fused 3-D experts are not): merge into the 16-bit base instead"
        )
    if scale.dtype not in SCALE_DTYPES:
        raise CheckpointError(
            f"{where}: scale {scale.name!r} is {scale.dtype}; streammerge reads FP8 scales in "
            f"{', '.join(sorted(SCALE_DTYPES))}: merge into the 16-bit base instead"
        )
    want = {"block": [grid((shape[0], shape[1]), block)], "channel": [(shape[0], 1)], "tensor": [(), (1,), (1, 1)]}
    if scale.shape not in want[strategy]:
        shown = " or ".join(str(list(s)) for s in want[strategy])
        raise CheckpointError(
            f"{where}: scale {scale.name!r} has shape {list(scale.shape)}, but weight {weight!r} "
            f"{list(shape)} with {strategy} scales {'of ' + str(list(block)) + ' ' if strategy == 'block' else ''}"
            f"needs {shown}; the checkpoint is corrupt or its quantization_config is wrong"
        )
