"""GPTQ and AWQ checkpoints: the layout (which stored tensors make which Linear weight). Pure.

See ``streammerge.formats.gptq`` (the codec, torch) for the packing and the arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from streammerge.errors import CheckpointError, PlanError
from streammerge.formats.base import CODES, QuantIndex, QuantizedWeight, QuantScheme
from streammerge.formats.bnb_layout import KEEP_REFUSAL, no_weights

if TYPE_CHECKING:
    from streammerge.formats.safetensors import TensorInfo

GPTQ_BITS = (2, 4, 8)  # 3-bit GPTQ packs across word boundaries and is not supported
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # packed nibble j -> output column 8c + AWQ_ORDER[j]
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # output column 8c + m <- packed nibble AWQ_REVERSE[m]


# --------------------------------------------------------------------------------------------
# The formats: quant_method "gptq" and "awq", dequantize only. Every part is read whole (its rows pack bits
# of every weight row); the codec decodes the block's column slab (``GPTQCodec.decode_rows``).

_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


@dataclass(frozen=True, slots=True)
class PackedWeight(QuantizedWeight):
    """A GPTQ / AWQ Linear: the packing settings decode needs and each part's row count."""

    bits: int = 4
    group_size: int = 128
    zero_offset: int = 0  # 1 for GPTQ v1 checkpoints (zero - 1 stored)
    lengths: tuple[tuple[str, int], ...] = ()


class _PackedInt:
    """What GPTQ and AWQ share: index by ``<m>.qweight``; whole-layer blocks; never re-encoded or kept."""

    name = ""
    roles: tuple[str, ...] = ()  # companion roles besides ``CODES`` (= qweight)

    def claims(self, qc: Mapping[str, object]) -> bool:
        return qc.get("quant_method") == self.name

    def settings(self, qc: Mapping[str, object], where: str) -> tuple[int, int, int]:
        """(bits, group_size, zero_offset) from the config; CheckpointError when this reader cannot handle them."""
        raise NotImplementedError

    def expected(self, stem: str, qweight: TensorInfo, bits: int, group: int) -> tuple[tuple[int, int], dict]:
        """The Linear weight's (out, in) and each companion role's expected shape."""
        raise NotImplementedError

    def index(self, qc: Mapping[str, object], tensors: Mapping[str, TensorInfo], where: str) -> QuantIndex:
        bits, group, offset = self.settings(qc, where)
        kind = self.name.upper()
        weights: dict[str, QuantizedWeight] = {}
        for name in tensors:
            if not name.endswith(_SUFFIXES):
                continue
            stem = name.rsplit(".", 1)[0]
            need = {CODES: f"{stem}.qweight", **{r: f"{stem}.{r}" for r in self.roles}}
            missing = [n for n in need.values() if n not in tensors]
            if missing:
                raise CheckpointError(f"{where}: {kind} tensor {name!r} comes without {missing[0]!r}; "
                                      "the checkpoint is incomplete: re-download it")
            if f"{stem}.weight" in weights:
                continue
            if f"{stem}.weight" in tensors:
                raise CheckpointError(f"{where}: tensor {stem + '.weight'!r} is stored both plain and as "
                                      f"{kind} {need[CODES]!r}; keep one of them")
            qweight = tensors[need[CODES]]
            if len(qweight.shape) != 2 or qweight.dtype != "I32":
                raise CheckpointError(f"{where}: {kind} tensor {need[CODES]!r} is {qweight.dtype} "
                                      f"{list(qweight.shape)}, expected 2-D I32; the checkpoint is corrupt")
            shape, want = self.expected(stem, qweight, bits, group)
            if f"{stem}.g_idx" in tensors and self.name == "gptq":
                need["g_idx"], want["g_idx"] = f"{stem}.g_idx", ((shape[1],), ("I32",))
            for role, (dims, dtypes) in want.items():
                info = tensors[need[role]]
                if info.shape != dims or info.dtype not in dtypes:
                    raise CheckpointError(
                        f"{where}: {kind} tensor {need[role]!r} is {info.dtype} {list(info.shape)}, expected "
                        f"{'/'.join(dtypes)} {list(dims)} for bits={bits}, group_size={group}; the checkpoint is "
                        "corrupt or its quantization_config is wrong")
            scales = tensors[need["scales"]]
            # any rows decode alone (the codec unpacks their column slab of every part): row_align 1
            scheme = QuantScheme(self.name, "block", (1, shape[1]), scales.dtype, scales.dtype, 0.0,
                                 reencodable=False)
            lengths = tuple((r, tensors[n].shape[0]) for r, n in need.items())
            weights[f"{stem}.weight"] = PackedWeight(f"{stem}.weight", shape, tuple(need.items()), scheme,
                                                     bits, group if group > 0 else shape[1], offset, lengths)
        if not weights:
            raise no_weights(where, qc, "no '*.qweight' tensor")
        return QuantIndex(self.name, MappingProxyType(weights), MappingProxyType(dict(qc)))

    def rows(self, qw: QuantizedWeight, role: str, r0: int, r1: int) -> tuple[int, int]:
        assert isinstance(qw, PackedWeight)
        return 0, dict(qw.lengths)[role]  # whole parts (zero-copy maps): every weight row needs every packed row

    def output_config(
        self, qc: Mapping[str, object], dequantized: bool, touched: frozenset[str]
    ) -> dict[str, object] | None:
        if not dequantized:
            raise PlanError(KEEP_REFUSAL.format(kind=self.name.upper()))
        return None


def _int(qc: Mapping[str, object], key: str, default: int) -> int | None:
    v = qc.get(key, default)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


_SCALE_DTYPES = ("F16", "BF16", "F32")


class GPTQ(_PackedInt):
    name = "gptq"
    roles = ("qzeros", "scales")

    def settings(self, qc: Mapping[str, object], where: str) -> tuple[int, int, int]:
        bits, group = _int(qc, "bits", 4), _int(qc, "group_size", 128)
        if bits not in GPTQ_BITS or group is None or (group <= 0 and group != -1):
            raise CheckpointError(f"{where}: quantization_config bits={qc.get('bits')!r}, group_size="
                                  f"{qc.get('group_size')!r}: streammerge reads 2/4/8-bit GPTQ with a positive "
                                  "group size or -1; merge into the 16-bit base instead")
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{where}: quantization_config.checkpoint_format={fmt!r} is a kernel layout, not "
                                  "GPTQ's; re-save the model in the 'gptq' format or merge into the 16-bit base")
        return bits, group, 1 if fmt == "gptq" else 0

    def expected(self, stem, qweight, bits, group):
        pack = 32 // bits
        inp, out = qweight.shape[0] * pack, qweight.shape[1]
        groups = -(-inp // group) if group > 0 else 1
        return (out, inp), {"qzeros": ((groups, -(-out // pack)), ("I32",)), "scales": ((groups, out), _SCALE_DTYPES)}



class AWQ(_PackedInt):
    name = "awq"
    roles = ("qzeros", "scales")

    def settings(self, qc: Mapping[str, object], where: str) -> tuple[int, int, int]:
        bits, group = _int(qc, "bits", 4), _int(qc, "group_size", 128)
        version = str(qc.get("version", "gemm")).lower()
        if bits != 4 or group is None or group <= 0 or version != "gemm" or qc.get("zero_point", True) is not True:
            raise CheckpointError(f"{where}: quantization_config bits={qc.get('bits')!r}, group_size="
                                  f"{qc.get('group_size')!r}, version={qc.get('version')!r}, zero_point="
                                  f"{qc.get('zero_point')!r}: streammerge reads 4-bit AWQ GEMM with zero points; "
                                  "merge into the 16-bit base instead")
        return bits, group, 0

    def expected(self, stem, qweight, bits, group):
        inp, out = qweight.shape[0], qweight.shape[1] * 8
        groups = -(-inp // group)
        return (out, inp), {"qzeros": ((groups, qweight.shape[1]), ("I32",)), "scales": ((groups, out), _SCALE_DTYPES)}
