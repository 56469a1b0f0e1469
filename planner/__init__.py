"""planner: a quantization and compression what-if planner for PyTorch models."""

import logging
import warnings

__version__ = "0.1.0"


def quiet_library_noise() -> None:
    """Silence import-time chatter that is not about the user's model: torchao's optional CUDA extensions
    failing to load on a CPU machine, torch's pytree deprecation notes, and library deprecation warnings.
    The CLI calls this unless --debug; errors still reach the user."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
