"""GPT-OSS MXFP4 checkpoints: the layout (which stored tensors make which parameter). Pure.

``config.quantization_config = {quant_method: "mxfp4", modules_to_not_convert: [...]}``; a fused expert parameter
``<m>.mlp.experts.<p>`` is stored as ``<p>_blocks`` U8 (E, R, G, 16) and ``<p>_scales`` U8 (E, R, G); the
in-memory parameter is (E, C = G·32, R). Decoding is ``streammerge.formats.mxfp4`` (the codec, torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from streammerge.errors import CheckpointError
from streammerge.formats.base import CODES, QuantIndex, QuantizedWeight, QuantScheme
from streammerge.formats.bnb_layout import no_weights

if TYPE_CHECKING:
    from streammerge.formats.safetensors import TensorInfo

METHOD = "mxfp4"
SCALES = "scales"  # role of the E8M0 part (the blocks are ``CODES``)
GROUP = 32  # values per E8M0 scale
BYTES_PER_GROUP = GROUP // 2
E8M0_BIAS = 127
BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"


def param_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The in-memory parameter's shape for a ``_blocks`` tensor of ``blocks_shape`` (…, R, G, 16) -> (…, G·32, R)."""
    *lead, rows, groups, width = blocks_shape
    return (*lead, groups * 2 * width, rows)


def check_pair(blocks_shape: tuple[int, ...], scales_shape: tuple[int, ...]) -> str | None:
    """Why a ``(_blocks, _scales)`` pair of these shapes is not MXFP4, or None when it is."""
    if len(blocks_shape) < 3 or blocks_shape[-1] != BYTES_PER_GROUP:
        return f"blocks shape {blocks_shape} should be (..., rows, groups, {BYTES_PER_GROUP})"
    if tuple(scales_shape) != tuple(blocks_shape[:-1]):
        return f"scales shape {tuple(scales_shape)} should be {tuple(blocks_shape[:-1])} (one per 32-value group)"
    return None


class MXFP4:
    """GPT-OSS ``quant_method: "mxfp4"`` checkpoints: fused 3-D expert parameters as ``_blocks`` + ``_scales``.

    A quantized weight is the in-memory parameter (what ``target_parameters`` adapts), e.g.
    ``….mlp.experts.gate_up_proj`` of shape (E, C, R); its rows are experts (a 3-D task's rows are its first
    axis): rows ``[e0, e1)`` read experts ``[e0, e1)`` of both parts.

    Never re-encoded: re-rounding to FP4 would bury a LoRA delta. Without dequantization, a touched weight is
    written in the output dtype under its parameter name and its experts module (gate_up_proj and down_proj
    together: :meth:`written_together`) is added to ``modules_to_not_convert``, which transformers reads.
    """

    name = METHOD

    def claims(self, qc: Mapping[str, object]) -> bool:
        return qc.get("quant_method") == METHOD

    def index(self, qc: Mapping[str, object], tensors: Mapping[str, TensorInfo], where: str) -> QuantIndex:
        weights: dict[str, QuantizedWeight] = {}
        for name, t in tensors.items():
            if name.endswith(SCALES_SUFFIX) and name.removesuffix(SCALES_SUFFIX) + BLOCKS_SUFFIX not in tensors:
                owner = name.removesuffix(SCALES_SUFFIX) + BLOCKS_SUFFIX
                raise CheckpointError(
                    f"{where}: tensor {name!r} is an MXFP4 scale but its blocks {owner!r} are in no shard; the "
                    "checkpoint is incomplete: re-download it"
                )
            if not name.endswith(BLOCKS_SUFFIX):
                continue
            param = name.removesuffix(BLOCKS_SUFFIX)
            scales = tensors.get(param + SCALES_SUFFIX)
            if scales is None:
                raise CheckpointError(
                    f"{where}: MXFP4 tensor {name!r} has no {param + SCALES_SUFFIX!r} in any shard; without its "
                    "scales it cannot be dequantized: the checkpoint is incomplete, re-download it"
                )
            problem = check_pair(t.shape, scales.shape)
            if t.dtype != "U8" or scales.dtype != "U8":
                problem = f"blocks are {t.dtype} and scales {scales.dtype}, both should be U8"
            elif problem is None and len(t.shape) != 4:
                problem = f"blocks shape {t.shape} is not fused experts (experts, rows, groups, 16)"
            if problem:
                raise CheckpointError(
                    f"{where}: MXFP4 tensor {name!r}: {problem}; the checkpoint is corrupt or not GPT-OSS MXFP4"
                )
            if param in tensors:
                raise CheckpointError(
                    f"{where}: tensor {param!r} is stored both plain and as MXFP4 {name!r}; keep one of them"
                )
            shape = param_shape(t.shape)  # (E, C, R)
            scheme = QuantScheme(METHOD, "block", (1, shape[1] * shape[2]), "U8", "F32", 0.0, reencodable=False)
            weights[param] = QuantizedWeight(param, shape, ((CODES, name), (SCALES, scales.name)), scheme)
        if not weights:
            raise no_weights(where, qc, f"no '*{BLOCKS_SUFFIX}' tensor")
        return QuantIndex(METHOD, MappingProxyType(weights), MappingProxyType(dict(qc)))

    def rows(self, qw: QuantizedWeight, role: str, r0: int, r1: int) -> tuple[int, int]:
        return r0, r1  # experts

    def written_together(self, index: QuantIndex, name: str) -> tuple[str, ...]:
        """The quantized weights that must be written dequantized with ``name`` (same module, same config entry)."""
        module = name.rsplit(".", 1)[0]
        return tuple(sorted(w for w in index.weights if w.rsplit(".", 1)[0] == module))

    def output_config(
        self, qc: Mapping[str, object], dequantized: bool, touched: frozenset[str]
    ) -> dict[str, object] | None:
        """None when dequantized; else ``qc`` with every touched weight's module in ``modules_to_not_convert``."""
        if dequantized:
            return None
        out = dict(qc)
        keep = list(out.get("modules_to_not_convert") or [])
        out["modules_to_not_convert"] = keep + sorted({t.rsplit(".", 1)[0] for t in touched} - set(keep))
        return out
