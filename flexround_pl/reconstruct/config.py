"""Hyper-parameters of block reconstruction (the ``model.reconstruction`` config section).

The number of iterations per block is the Lightning trainer's ``max_steps``;
everything else about one block's optimization lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class ReconstructionConfig:
    """Block reconstruction settings.

    ``lr``: the Adam learning rate of all learnable weight-quantizer parameters
    (cosine-decayed to 0 over ``max_steps``; activation step sizes have their
    own group, ``quant.activation.lr``); the paper uses 2e-4 (BERT),
    3e-4 (GPT-Neo), 4e-4 / 1e-3 (ImageNet CNNs).
    ``batch_size``: calibration samples per step.
    ``eval_batch_size``: samples per forward when computing targets, pushing
    the cache forward and measuring the loss.
    ``evaluations``: how often per block the full-calibration loss (hard
    rounding, quantized inputs) is measured; the parameters with the lowest
    such loss, the initial grid included, are kept at the end of the block.
    ``validate_initial``: also measure the initial grid's loss (step 0), so a
    block whose training ends worse keeps its initial grid. It is one more
    pass over the calibration set per block (about 11 % of a 20-step SmolLM2
    run); ``false`` saves it and reports no initial loss. On SmolLM2 the last
    step beat the initial grid in all 600 blocks of 20 runs measured.
    ``seed``: seeds each block's sampling (block ``i`` uses ``seed + i``).
    ``qdrop_p``: QDrop (Wei et al., ICLR 2022) during training steps: each
    element of the block input is the quantized-network input with probability
    ``p`` and the FP-network input otherwise, and each activation quantizer
    keeps its quantized output with probability ``p`` (else its FP input).
    ``1`` trains on quantized inputs with every activation quantized (no drop);
    ``0`` trains on FP inputs with FP activations. Validation, hardening and
    evaluation never drop. ``None`` (default): 0.5 when activations are
    quantized (``quant.activation.bits``), else 1 (plain quantized-input
    reconstruction, as weight-only FlexRound).
    ``cache``: where the calibration cache (block inputs / targets of every
    sample) lives: ``memory`` (RAM), ``disk`` (memory-mapped files in
    ``cache_dir``) or ``auto`` (default: disk when the estimated cache exceeds
    half of the available memory, see
    :mod:`flexround_pl.reconstruct.cache`). Results are identical either way.
    ``cache_dir``: directory of the disk cache; default ``<run dir>/cache``
    (the files are unlinked as soon as they are mapped).
    ``holdout``: fraction of the calibration samples kept out of training
    (the same seeded subset for every block). With ``holdout > 0`` the
    best-step choice and early stopping use the loss on those samples
    (logged ``block_XX/holdout_loss``); with 0 they use the loss on all
    calibration samples, the training data itself (``block_XX/calibration_loss``).
    ``patience``: stop a block's training after this many ``evaluations``
    without a lower holdout loss (0: never; needs ``holdout > 0``).
    ``token_loss``: how the positions of a text block's output weigh in its
    loss (training, best-step choice and reported losses alike): ``mse``
    (equally), ``relative`` (each by ``1 / ||target||^2``) or
    ``drop_massive`` (positions whose target norm exceeds ``massive_ratio`` x
    the median left out). SmolLM2's first position carries ~99 % of a block
    output's squared norm from layer 11 on (massive activations), so plain
    MSE mostly fits that one token (measured: README "SmolLM2: every method, ..., and the LLM recipe").
    """

    lr: float = 1e-3
    batch_size: int = 32
    eval_batch_size: int = 64
    evaluations: int = 4
    validate_initial: bool = True
    seed: int = 0
    qdrop_p: Optional[float] = None
    cache: Literal["memory", "disk", "auto"] = "auto"
    cache_dir: Optional[str] = None
    holdout: float = 0.0
    patience: int = 0
    token_loss: Literal["mse", "relative", "drop_massive"] = "mse"
    massive_ratio: float = 20.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"reconstruction.lr must be positive, got {self.lr}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"reconstruction.{name} must be >= 1, got {getattr(self, name)}")
        if self.evaluations < 0:
            raise ValueError(f"reconstruction.evaluations must be >= 0, got {self.evaluations}")
        if self.qdrop_p is not None and not 0.0 <= self.qdrop_p <= 1.0:
            raise ValueError(f"reconstruction.qdrop_p must be in [0, 1], got {self.qdrop_p}")
        if self.cache not in ("memory", "disk", "auto"):
            raise ValueError(f"reconstruction.cache must be 'memory', 'disk' or 'auto', got {self.cache!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"reconstruction.holdout must be a fraction in [0, 1), got {self.holdout}")
        if self.token_loss not in ("mse", "relative", "drop_massive"):
            raise ValueError(
                f"reconstruction.token_loss must be 'mse', 'relative' or 'drop_massive', got {self.token_loss!r}"
            )
        if not self.massive_ratio > 1:
            raise ValueError(f"reconstruction.massive_ratio must be > 1 (x the median norm), got {self.massive_ratio}")
        if self.patience < 0:
            raise ValueError(f"reconstruction.patience must be >= 0, got {self.patience}")
        if self.patience > 0 and self.holdout == 0:
            raise ValueError(
                "reconstruction.patience needs held-out samples to stop on: set reconstruction.holdout "
                "(e.g. 0.1), or patience 0"
            )

    def selection_metric(self, tag: str) -> str:
        """The logged name of the loss that picks a block's best step (and stops it early)."""
        return f"{tag}/holdout_loss" if self.holdout > 0 else f"{tag}/calibration_loss"

    def effective_qdrop_p(self, activations_quantized: bool) -> float:
        """``qdrop_p``, or its default: 0.5 with activation quantization, 1 without."""
        if self.qdrop_p is not None:
            return float(self.qdrop_p)
        return 0.5 if activations_quantized else 1.0
