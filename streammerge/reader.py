"""Old import path of the tensor readers: see :mod:`streammerge.formats.reader` and ``formats.torchbin``."""

from streammerge.formats.reader import TensorReader
from streammerge.formats.torchbin import read_pickle_index

__all__ = ["TensorReader", "read_pickle_index"]
