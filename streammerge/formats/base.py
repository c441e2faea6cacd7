"""The protocol every quantized base format implements, and the values it hands the planner.

A format is a pure layout object (``BaseFormat``, listed in ``formats.registry``; the planner uses it) and a
codec (``Codec``, torch, listed in ``formats.codecs``; the executor uses it), joined by the format's name:

* ``index(qc, tensors, where)``: from the config and the checkpoint's tensor slots (headers only), the
  quantized weights, each with its companion tensors (scales …) by role, the logical (dequantized)
  shape and a ``QuantScheme``. Malformed input (a weight without its scale, a scale of the wrong
  shape, tensors of another format) raises ``CheckpointError`` naming the tensor. Pure: no torch.
* ``rows(qw, role, r0, r1)``: which rows of a stored part hold weight rows ``[r0, r1)``. Row blocks the
  executor asks for start at multiples of ``qw.scheme.row_align`` (the last may end at the tensor end),
  so each block owns whole scale cells.
* codec ``decode(qw, parts, out_dtype)``: stored rows (by role) → the dequantized rows, bit-identical to the
  format's reference dequantizer.
* codec ``encode(qw, w, amax)``: merged rows → stored rows by role, in the base's own scheme with fresh scales
  (only for ``scheme.reencodable`` formats; others are written dequantized or refused, per format).
  A per-tensor scale depends on every row (``scheme.whole_tensor_scale``): the executor first walks the
  merged tensor for its ``amax`` (``amax(qw, w)`` per block, max-combined) and passes it in.
* ``output_config(qc, dequantized, touched)``: the ``quantization_config`` to write (None: remove it).

``streammerge.formats.registry`` lists the formats and detects the one a checkpoint uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from streammerge.formats.safetensors import TensorInfo

#: Role of the stored codes in ``QuantizedWeight.parts``; other roles are the format's companions.
CODES = "weight"
#: Role of a scale part (FP8 formats).
SCALE = "scale"


#: Name suffixes of activation-quantization tensors (``QuantIndex.extras``).
ACTIVATION_SCALES = (".input_scale", ".output_scale", ".activation_scale")


def grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a (rows, cols) weight cut into ``block`` cells (edge cells partial)."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """How one weight is quantized: what decode/encode and the planner's memory model need.

    ``block`` is the number of weight elements per scale cell (rows, cols): per-channel is ``(1, in)``,
    per-tensor ``(out, in)``. ``row_align`` is the row granularity of independent blocks.
    """

    format: str  # registry name, e.g. "fp8-block"
    strategy: str  # "block" | "channel" | "tensor"
    block: tuple[int, int]
    scale_dtype: str  # safetensors code of the scale part
    product_dtype: str  # dtype the product codes·scale is rounded to before the output cast
    zero_scale: float  # scale stored for an all-zero cell on encode
    pow2_scale: bool = False  # fresh scales are powers of two (block FP8 ``scale_fmt: ue8m0``)
    reencodable: bool = True  # can a merged weight be written back in this scheme? (else: refused without --dequantize)

    @property
    def row_align(self) -> int:
        """Row blocks start at multiples of this (a per-channel or per-tensor scale fits any rows)."""
        return self.block[0] if self.strategy == "block" else 1

    @property
    def whole_tensor_scale(self) -> bool:
        """True when a fresh scale depends on every row (per-tensor): encoding needs a pre-pass."""
        return self.strategy == "tensor"


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """One quantized weight: its stored parts by role (``CODES`` first) and its logical shape."""

    name: str  # the logical weight name (what an adapter targets), e.g. "model.layers.0.mlp.up_proj.weight"
    shape: tuple[int, ...]  # the dequantized shape
    parts: tuple[tuple[str, str], ...]  # (role, stored tensor name): ("weight", codes), ("scale", its scale)
    scheme: QuantScheme

    def part(self, role: str) -> str:
        return dict(self.parts)[role]

    @property
    def companions(self) -> tuple[str, ...]:
        return tuple(name for role, name in self.parts if role != CODES)


@dataclass(frozen=True, slots=True)
class QuantIndex:
    """What a checkpoint's quantization means, tensor by tensor (from headers and config only)."""

    format: str
    weights: Mapping[str, QuantizedWeight]  # by logical weight name
    config: Mapping[str, object]  # the checkpoint's quantization_config
    #: stored tensors of the quantization that belong to no weight (static activation scales): copied raw when
    #: the format is kept, dropped with the quantization_config when dequantizing (loaders then ignore them)
    extras: tuple[str, ...] = ()

    def companion_of(self) -> dict[str, QuantizedWeight]:
        """Every companion tensor name → the weight it belongs to."""
        return {c: qw for qw in self.weights.values() for c in qw.companions}


class BaseFormat(Protocol):
    """One quantized checkpoint format's layout (pure; see the module docstring for the contract)."""

    name: str

    def claims(self, qc: Mapping[str, object]) -> bool:
        """True when this format reads checkpoints with this ``quantization_config``."""
        ...

    def index(self, qc: Mapping[str, object], tensors: Mapping[str, TensorInfo], where: str) -> QuantIndex:
        """Pair every quantized weight with its companions; raise CheckpointError on malformed input."""
        ...

    def rows(self, qw: QuantizedWeight, role: str, r0: int, r1: int) -> tuple[int, int]:
        """Rows of part ``role`` that hold weight rows ``[r0, r1)``."""
        ...

    def output_config(
        self, qc: Mapping[str, object], dequantized: bool, touched: frozenset[str]
    ) -> dict[str, object] | None:
        """The ``quantization_config`` of the output (None: remove it from config.json)."""
        ...


class Codec(Protocol):
    """One format's arithmetic (torch), found by ``QuantScheme.format`` in ``formats.codecs``."""

    def decode(self, qw: QuantizedWeight, parts: Mapping[str, torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        """Stored rows by role → dequantized rows (``out_dtype``), bit-identical to the reference dequantizer."""
        ...

    def amax(self, qw: QuantizedWeight, w: torch.Tensor) -> torch.Tensor:
        """max |w| per scale cell of these merged rows (fp32)."""
        ...

    def encode(self, qw: QuantizedWeight, w: torch.Tensor, amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Merged rows → stored rows by role (scales as a 2-D grid of cells), fresh scales from ``amax`` or ``w``."""
        ...

    def scales(self, qw: QuantizedWeight, amax: torch.Tensor) -> torch.Tensor:
        """The fresh scales (2-D grid of cells, the scale dtype) for these per-cell amax values."""
        ...

    def error(
        self, qw: QuantizedWeight, encoded: Mapping[str, torch.Tensor], merged: torch.Tensor
    ) -> tuple[float, float]:
        """(max |dequant(encoded) − merged|, its max ratio to half a quantization step) over these rows."""
        ...
