"""The codec (decode / amax / encode, torch) of each format in ``registry.FORMATS``, by format name."""

from __future__ import annotations

from streammerge.formats.base import Codec
from streammerge.formats.bnb import BnbCodec
from streammerge.formats.fp8 import FP8Codec
from streammerge.formats.gptq import AWQCodec, GPTQCodec
from streammerge.formats.mxfp4 import MXFP4Codec

_FP8 = FP8Codec()
CODECS: dict[str, Codec] = {
    "fp8-block": _FP8,
    "compressed-fp8": _FP8,
    "mxfp4": MXFP4Codec(),
    "bitsandbytes": BnbCodec(),
    "gptq": GPTQCodec(),
    "awq": AWQCodec(),
}


def codec_for(format_name: str) -> Codec:
    return CODECS[format_name]
