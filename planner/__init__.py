"""planner: a quantization and compression what-if planner for PyTorch models."""

__version__ = "0.1.0"
