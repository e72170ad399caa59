"""finegrain: fine-grained credit assignment for language-model alignment.

Every reward source returns a dense ``[B, T]`` token reward (plus a mask); every optimizer consumes it.
Importing the package imports nothing heavier than the standard library; submodules import torch,
transformers, datasets and accelerate where they need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
