"""The torch side of the model worker: architecture config, decoder, attention, weight loading.

Importing this package is cheap; the torch modules (``llama``, ``attention``, ``loader``) are
imported by whoever needs them, so the scheduling core can read a ``ModelArchConfig`` without
pulling in torch.
"""

from loopserve.core.model.arch_config import ModelArchConfig

__all__ = ["ModelArchConfig"]
