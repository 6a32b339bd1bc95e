"""Block reconstruction: the calibration cache, the per-block LightningModule and the driver."""

from flexround_pl.reconstruct.cache import CalibrationCache
from flexround_pl.reconstruct.config import ReconstructionConfig

__all__ = ["CalibrationCache", "ReconstructionConfig"]
