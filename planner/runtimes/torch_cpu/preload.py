"""Imported once by the verification fork server (planner.measure.isolation): what every torch worker imports before
its baseline, with torchao's import-time chatter silenced (the server shares the planner's terminal)."""

from planner import quiet_library_noise

quiet_library_noise()

import torch  # noqa: E402, F401
import torchao  # noqa: E402, F401

import planner.analysis.artifact  # noqa: E402, F401
import planner.models.sources  # noqa: E402, F401
import planner.recipes.recipe  # noqa: E402, F401
import planner.runtimes.torch_cpu.worker  # noqa: E402, F401
from planner.schemes import import_tensor_types  # noqa: E402

import_tensor_types()  # every scheme's tensor modules (the prototype int4 among them)
