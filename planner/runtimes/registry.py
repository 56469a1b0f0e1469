"""The runtimes a plan can verify on, by the name --backend and the row's backend column use."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from planner.runtimes.base import Runtime
from planner.runtimes.executorch.runtime import ExecuTorchRuntime
from planner.runtimes.onnxruntime.runtime import OnnxRuntime
from planner.runtimes.torch_cpu.runtime import TorchCpu

RUNTIMES: dict[str, Callable[[], Runtime]] = {TorchCpu.name: TorchCpu, OnnxRuntime.name: OnnxRuntime,
                                               ExecuTorchRuntime.name: ExecuTorchRuntime}
# The Python package each runtime needs beyond the planner's own dependencies.
OPTIONAL_PACKAGES = {OnnxRuntime.name: "onnxruntime", ExecuTorchRuntime.name: "executorch"}


def create(name: str) -> Runtime:
    """A fresh runtime for one plan (it may keep what its rows share)."""
    return RUNTIMES[name]()


def available(name: str) -> bool:
    package = OPTIONAL_PACKAGES.get(name)
    return package is None or importlib.util.find_spec(package) is not None
