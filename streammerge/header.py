"""Old import path of the safetensors header codec: see :mod:`streammerge.formats.safetensors`."""

from streammerge.formats.dtypes import DTYPE_SIZES, FLOAT_DTYPES
from streammerge.formats.safetensors import (
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorInfo,
    encode_header,
    parse_header,
    read_header,
)

__all__ = ["DTYPE_SIZES", "FLOAT_DTYPES", "MAX_HEADER_BYTES", "SafetensorsHeader", "TensorInfo", "encode_header",
           "parse_header", "read_header"]
