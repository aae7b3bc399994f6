"""PyTorch FSDP2 training engine for areal."""

__version__ = "0.1.0"
