"""The quantized base formats streammerge knows, and detection of the one a checkpoint uses.

``detect(config, tensors, where)`` reads ``config.json``'s ``quantization_config`` and the tensor slots:

* no ``quantization_config`` and no quantized-looking tensor: ``None`` (a plain checkpoint);
* a ``quant_method`` a format in ``FORMATS`` claims: that format's ``QuantIndex``, after checking that
  every quantized-looking tensor belongs to it (else: mixed formats, refused naming the tensor);
* anything else: ``CheckpointError`` naming the config or the tensor (unknown ``quant_method``,
  quantized tensors without a ``quantization_config``, a known format streammerge cannot merge into).

Pure (no torch): the planner uses it. The torch side, decoding and encoding, is ``formats.codecs``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from streammerge.errors import CheckpointError
from streammerge.formats.base import BaseFormat, QuantIndex
from streammerge.formats.blockfp8 import BlockFP8
from streammerge.formats.bnb_layout import Bitsandbytes
from streammerge.formats.compressed import CompressedFP8, formats_of
from streammerge.formats.gptq_layout import AWQ, GPTQ
from streammerge.formats.mxfp4_layout import MXFP4

if TYPE_CHECKING:
    from streammerge.formats.safetensors import TensorInfo

#: Every supported format; the first whose ``claims`` accepts the config reads the checkpoint.
FORMATS: tuple[BaseFormat, ...] = (BlockFP8(), CompressedFP8(), MXFP4(), Bitsandbytes(), GPTQ(), AWQ())

#: Tensor-name markers of quantized storage, with the format family they reveal.
MARKERS: tuple[tuple[str, str], ...] = (
    (".weight_scale_inv", "block FP8"),
    (".weight_scale", "compressed-tensors"),
    (".weight_packed", "compressed-tensors pack-quantized"),
    (".weight.absmax", "bitsandbytes 4-bit"),
    (".weight.quant_map", "bitsandbytes 4-bit"),
    (".SCB", "bitsandbytes 8-bit"),
    (".weight_format", "bitsandbytes 8-bit"),
    (".qweight", "GPTQ/AWQ"),
    (".qzeros", "GPTQ/AWQ"),
    ("_blocks", "MXFP4"),
)
#: quant_methods transformers knows that no format here reads (a clearer message than "unknown").
_KNOWN_ELSEWHERE = ("hqq", "torchao", "eetq", "quanto", "aqlm", "fbgemm_fp8")


def format_named(name: str) -> BaseFormat:
    """The format whose ``name`` a ``QuantScheme.format`` holds."""
    return next(f for f in FORMATS if f.name == name)


def marker(name: str) -> str | None:
    """The format family a tensor name reveals, or None for an ordinary tensor."""
    if ".quant_state." in name:
        return "bitsandbytes 4-bit"
    return next((kind for suffix, kind in MARKERS if name.endswith(suffix)), None)


def detect(
    config: Mapping[str, object],
    tensors: Mapping[str, TensorInfo],
    where: str,
    read: Callable[[str], bytes] | None = None,
) -> QuantIndex | None:
    """The quantization of a checkpoint (``where`` names its config.json in messages); see the module doc.

    ``read(name)`` returns a stored tensor's bytes: a format with ``blob_names`` (bitsandbytes keeps each
    weight's shape and block size in a small JSON tensor) reads those few tensors through it while indexing.
    """
    qc = config.get("quantization_config")
    if qc is None:
        for name, t in tensors.items():
            kind = marker(name) or ("FP8" if t.dtype in ("F8_E4M3", "F8_E5M2") else None)
            if kind:
                raise CheckpointError(
                    f"{where}: tensor {name!r} looks {kind}-quantized but config.json has no quantization_config; "
                    "restore the model's config.json (it says how to dequantize) or use the 16-bit base"
                )
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config is not a JSON object; fix config.json")
    method = qc.get("quant_method")
    fmt = next((f for f in FORMATS if f.claims(qc)), None)
    if fmt is None:
        raise CheckpointError(f"{where}: {_unsupported(method, qc)}")
    if hasattr(fmt, "blob_names"):
        assert read is not None, f"detect() needs read= to index {fmt.name} checkpoints"
        index = fmt.index(qc, tensors, where, read)
    else:
        index = fmt.index(qc, tensors, where)
    own = set(index.weights) | {name for qw in index.weights.values() for _, name in qw.parts} | set(index.extras)
    for name in tensors:
        kind = marker(name)
        if kind and name not in own:
            raise CheckpointError(
                f"{where}: tensor {name!r} is {kind} storage, but quantization_config says {method!r} "
                f"({fmt.name}); mixed quantization formats are not supported: use one consistent checkpoint"
            )
    return index


def _unsupported(method: object, qc: Mapping[str, object]) -> str:
    if method == "compressed-tensors":
        return (
            f"compressed-tensors format {sorted(formats_of(qc)) or 'unset'} is not supported (streammerge reads "
            "'float-quantized' FP8); merge into the 16-bit base, or dequantize the checkpoint first"
        )
    if method in _KNOWN_ELSEWHERE:
        return (
            f"quantization_config.quant_method={method!r}: streammerge cannot merge into this format yet; "
            "merge into the 16-bit base instead"
        )
    known = ", ".join(sorted({"fp8", "compressed-tensors", "mxfp4", "bitsandbytes", "gptq", "awq", *_KNOWN_ELSEWHERE}))
    return (
        f"quantization_config.quant_method={method!r} is not a quantization format streammerge knows "
        f"(known: {known}); fix config.json or use the 16-bit base"
    )
