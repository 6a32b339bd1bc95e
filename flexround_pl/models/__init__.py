"""Model sources (where weights come from) and architecture adapters (how to walk them)."""

from flexround_pl.models import bert, gpt2, gpt_neo, llama, opt  # noqa: F401  (register the adapters)
from flexround_pl.models.adapter import Architecture, find_architecture, register
from flexround_pl.models.sources import HFModel, ModelSource

__all__ = ["Architecture", "HFModel", "ModelSource", "find_architecture", "register"]
