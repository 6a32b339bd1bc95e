"""Hyper-parameters of block reconstruction (the ``model.reconstruction`` config section).

The number of iterations per block is the Lightning trainer's ``max_steps``;
everything else about one block's optimization lives here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReconstructionConfig:
    """Block reconstruction settings.

    ``lr``: the single Adam learning rate of all learnable quantizer parameters
    (cosine-decayed to 0 over ``max_steps``); the paper uses 2e-4 (BERT),
    3e-4 (GPT-Neo), 4e-4 / 1e-3 (ImageNet CNNs).
    ``batch_size``: calibration samples per step.
    ``eval_batch_size``: samples per forward when computing targets, pushing
    the cache forward and measuring the loss.
    ``evaluations``: how often per block the full-calibration loss (hard
    rounding, quantized inputs) is measured; the parameters with the lowest
    such loss, the initial grid included, are kept at the end of the block.
    ``seed``: seeds each block's sampling (block ``i`` uses ``seed + i``).
    """

    lr: float = 1e-3
    batch_size: int = 32
    eval_batch_size: int = 64
    evaluations: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"reconstruction.lr must be positive, got {self.lr}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"reconstruction.{name} must be >= 1, got {getattr(self, name)}")
        if self.evaluations < 0:
            raise ValueError(f"reconstruction.evaluations must be >= 0, got {self.evaluations}")
