"""first-gguf converter: GGUF files with router tensors and first.* metadata.

Installed as ``first_gguf.convert``.
"""
from .gguf_edit import GGUFEditError, read_gguf, rewrite_gguf

__all__ = ["GGUFEditError", "read_gguf", "rewrite_gguf"]
