"""Model sources (where weights come from) and architecture adapters (how to walk them)."""

from flexround_pl.models import bert, cnn, generic, gpt2, gpt_neo, opt  # noqa: F401  (register the adapters)
from flexround_pl.models.adapter import Architecture, find_architecture, register
from flexround_pl.models.sources import HFModel, ModelSource
from flexround_pl.models.vision import FashionMNISTResNet18, TorchvisionModel

__all__ = [
    "Architecture", "FashionMNISTResNet18", "HFModel", "ModelSource", "TorchvisionModel", "find_architecture", "register",
]
