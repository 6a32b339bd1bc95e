"""Post-training quantization with FlexRound as a PyTorch Lightning application."""

__version__ = "0.1.0"
