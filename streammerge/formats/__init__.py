"""Base checkpoint formats: the dtype table, the safetensors header codec, pickled ``.bin`` indexing, and the
reader that maps stored tensors' rows.
"""
