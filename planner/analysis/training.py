"""Training mode: the memory of training steps (forward, loss, backward, optimizer.step), without real weights.

The model is traced on FakeTensors that claim to live on the CPU (no storage is ever allocated), with the same
liveness tracker as inference (planner.analysis.activations): every op's new storage is an allocation, freed when its
last
tensor dies. Under autograd that covers what a training step really holds: the tensors autograd saves for backward
(freed as backward consumes them), backward's temporaries, the gradients (AccumulateGrad), and the optimizer's
state and temporaries, which torch creates lazily in the first `optimizer.step()`. The optimizer is torch's own,
traced on the fake parameters with the implementation torch picks for real CPU tensors (the per-tensor loop:
torch's foreach kernels are used by default on CUDA only), so its temporaries are those of a real step.

One training step, identical in the trace and in the measured twin (planner.analysis.train_verify):
    optimizer.zero_grad(set_to_none=True); loss = training_loss(model(*inputs)); loss.backward(); optimizer.step()
with `training_loss` = the sum of `.mean()` over the model's floating outputs: a stand-in for a real loss that
works for any output shape and, like cross-entropy on logits, sends one output-sized gradient into backward.

Two steps are traced: step 1 creates the optimizer state (Adam's moments, SGD's momentum buffer) and step 2 starts
with it already resident, which is the steady state of a training loop. Figures are bytes above the resident
parameters and inputs, plus the parameters themselves for the totals.

Optimizers: `sgd` is SGD with momentum 0.9 (one buffer per parameter; plain SGD without momentum has no state),
`adam` and `adamw` keep exp_avg and exp_avg_sq per parameter plus a float32 step scalar each.

Quantized recipes (torchao) are not trainable this way: their weights are inference formats (tensor subclasses
with no gradient path to the quantized weight), so training figures for them would be invented.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from planner.analysis.activations import LivenessTracker, fake_state, storage_keys
from planner.analysis.footprint import cast_inputs
from planner.analysis.scratch import SCRATCH_OPS, Scratch, load_cache, scratch_bytes
from planner.core.errors import PlannerError
from planner.recipes.recipe import Recipe

MODES = ("infer", "train")
OPTIMIZERS = ("sgd", "adam", "adamw")
SGD_MOMENTUM = 0.9
LEARNING_RATE = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
STEP_SCALAR_BYTES = 4  # Adam's per-parameter `step` count is a float32 0-d tensor on CPU
TRACED_STEPS = 2
PHASES = ("zero_grad", "forward", "backward", "optimizer step")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise PlannerError(f"--mode {mode!r}: use infer or train")
    return mode


def check_optimizer(name: str) -> str:
    if name not in OPTIMIZERS:
        raise PlannerError(f"--optimizer {name!r}: use sgd (momentum {SGD_MOMENTUM}), adam or adamw")
    return name


def not_trainable_reason(recipe: Recipe) -> str | None:
    """Why a recipe has no training figures (None when it has): only dtype recipes train here."""
    if recipe.scheme is None:
        return None
    return (f"not trainable: {recipe.scheme.name} weights are torchao inference tensors with no gradient path "
            f"to the quantized weight; train in {recipe.dtype} and quantize afterwards")


def optimizer_state_rule(param_bytes: int, param_tensors: int, optimizer: str) -> int:
    """Optimizer state bytes by the book: SGD's momentum buffer, or Adam's two moments and step scalars."""
    check_optimizer(optimizer)
    if optimizer == "sgd":
        return param_bytes if SGD_MOMENTUM > 0 else 0
    return 2 * param_bytes + STEP_SCALAR_BYTES * param_tensors


def default_foreach() -> bool:
    """Whether torch's optimizers use their foreach implementation by default for CPU parameters.

    The trace runs on FakeTensors, which torch's own choice would not recognise as plain tensors, so the choice
    it makes for a real CPU tensor is passed explicitly.
    """
    from torch.optim.optimizer import _default_to_fused_or_foreach

    _fused, foreach = _default_to_fused_or_foreach([torch.empty(1)], differentiable=False, use_fused=False)
    return bool(foreach)


def make_optimizer(name: str, params: list[torch.Tensor], foreach: bool | None = None) -> torch.optim.Optimizer:
    check_optimizer(name)
    if name == "sgd":
        return torch.optim.SGD(params, lr=LEARNING_RATE[name], momentum=SGD_MOMENTUM, foreach=foreach)
    optimizer_class = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return optimizer_class(params, lr=LEARNING_RATE[name], foreach=foreach)


def training_loss(output: Any) -> torch.Tensor:
    """Sum over the floating outputs of their mean (see the module docstring)."""
    from planner.measure.library import floating_tensors

    tensors = floating_tensors(output)
    if not tensors:
        raise PlannerError("the model has no floating-point output to take a training loss of")
    loss = tensors[0].mean()
    for tensor in tensors[1:]:
        loss = loss + tensor.mean()
    return loss


def train_step(forward: Callable[[], Any], optimizer: torch.optim.Optimizer,
               on_phase: Callable[[str], None] = lambda _phase: None) -> None:
    """One training step; the model output lives only as long as the loss needs it, as in a training loop."""
    on_phase("zero_grad")
    optimizer.zero_grad(set_to_none=True)
    on_phase("forward")
    loss = training_loss(forward())
    on_phase("backward")
    loss.backward()
    del loss
    on_phase("optimizer step")
    optimizer.step()


@dataclass
class TrainingReport:
    optimizer: str
    dtype: str
    param_bytes: int
    grad_bytes: int               # gradients after backward (one per trainable parameter)
    optimizer_state_bytes: int    # after the first step created it
    saved_activation_bytes: int   # distinct storages autograd saved for backward in one forward
    step_peaks: list[int]         # per traced step: parameters + peak live bytes during that step
    step_peak_phases: list[str]   # per traced step: the phase where its peak happened
    foreach: bool
    fused_ops: list[str] = field(default_factory=list)  # kernels whose workspace is neither traced nor measured
    scratch_applied: dict[str, int] = field(default_factory=dict)  # op -> largest measured scratch added
    kept_scratch_bytes: int = 0  # what kernels' first calls leave resident (measured): scratchpads, caches
    scratch_failure: str | None = None

    @property
    def peak_bytes(self) -> int:
        return max(self.step_peaks)

    @property
    def peak_phase(self) -> str:
        step = self.step_peaks.index(self.peak_bytes)
        return f"step {step + 1} {self.step_peak_phases[step]}"


class _PhasedTracker(LivenessTracker):
    """The liveness tracker, also keeping the peak of the current step and the phase it happened in, and adding
    the measured scratch of kernels with hidden workspace (planner.analysis.scratch) on top of what is live after
    them."""

    def __init__(self, preexisting: set[int], scratch: dict[str, Scratch]) -> None:
        super().__init__(preexisting, scratch)
        self.phase = ""
        self.window_peak = 0
        self.window_phase = ""
        self.kept_bytes = 0  # what the library keeps after first calls (scratchpads, caches), never freed

    def _first_call(self, signature: str, measured: Scratch) -> None:
        # What a forward kernel keeps after its first use is in the baseline (the measured twin, like
        # the torch worker, runs one forward first); backward kernels first run inside the step.
        if signature not in self.scratch_calls and measured.kept and self.phase != "forward":
            self.live_bytes += measured.kept
            self.kept_bytes += measured.kept
            self._note_peak(self.live_bytes)

    def start_window(self) -> None:
        self.window_peak = self.live_bytes
        self.window_phase = self.phase

    def _note_peak(self, live_bytes: int) -> None:
        super()._note_peak(live_bytes)
        if live_bytes > self.window_peak:
            self.window_peak = live_bytes
            self.window_phase = self.phase


def training_footprint(meta_model: nn.Module, inputs: tuple[torch.Tensor, ...], optimizer: str = "adamw",
                       dtype: torch.dtype = torch.float32, steps: int = TRACED_STEPS,
                       measure_scratch: bool = True) -> TrainingReport:
    """Trace `steps` training steps of the meta model on FakeTensors (see the module docstring).

    Kernels with hidden workspace get their measured scratch (planner.analysis.scratch): from the per-machine cache,
    else,
    with measure_scratch, measured in a fresh process at these shapes, then the step is traced again with it.
    """
    report, calls = _trace_training(meta_model, inputs, optimizer, dtype, steps, load_cache())
    if measure_scratch and set(calls) - set(load_cache()):
        scratch, failure = scratch_bytes(calls)
        report, _calls = _trace_training(meta_model, inputs, optimizer, dtype, steps, scratch)
        report.scratch_failure = failure
    return report


def _trace_training(meta_model: nn.Module, inputs: tuple[torch.Tensor, ...], optimizer: str, dtype: torch.dtype,
                    steps: int, scratch: dict[str, Scratch]) -> tuple[TrainingReport, list[str]]:
    check_optimizer(optimizer)
    model = copy.deepcopy(meta_model).to(dtype).train()
    fake_mode, state, fake_inputs = fake_state(model, cast_inputs(inputs, dtype, "meta"), "cpu")
    trainable = [state[name].requires_grad_(True) for name, p in model.named_parameters() if p.requires_grad]
    param_bytes = sum(storage_keys([state[name] for name, _ in model.named_parameters()]).values())
    preexisting = set(storage_keys((state, fake_inputs)))
    tracker = _PhasedTracker(preexisting, scratch)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Saved parameters, inputs and views of them are not new memory; a storage saved twice counts once.
        # The tracker's size, not the fake storage's: it includes what a meta kernel left out (see _grow_outputs).
        saved.update({key: tracker.live.get(key, nbytes) for key, nbytes in storage_keys(tensor).items()
                      if key not in preexisting})
        return tensor

    grads: dict[str, int] = {}

    def on_phase(phase: str) -> None:
        tracker.phase = phase
        if phase == "optimizer step":  # backward is done: the gradients of the first step
            grads.setdefault("bytes", sum(storage_keys([p.grad for p in trainable if p.grad is not None]).values()))

    step_peaks: list[int] = []
    step_phases: list[str] = []
    foreach = default_foreach()
    try:
        with fake_mode, tracker:
            optim = make_optimizer(optimizer, trainable, foreach=foreach)
            for _ in range(steps):
                tracker.phase = PHASES[0]
                tracker.start_window()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                    train_step(lambda: torch.func.functional_call(model, state, fake_inputs), optim, on_phase)
                step_peaks.append(param_bytes + tracker.window_peak)
                step_phases.append(tracker.window_phase)
                saved_bytes = sum(saved.values())
                saved.clear()
            state_bytes = sum(storage_keys(list(optim.state.values())).values())
    finally:
        tracker.detach()
    # profiler.* are the optimizer's record_function markers; SCRATCH_OPS have their workspace measured.
    hidden = sorted(op for op in tracker.fused_ops if not op.startswith("profiler.") and op not in SCRATCH_OPS)
    return TrainingReport(
        optimizer=optimizer, dtype=str(dtype).removeprefix("torch."), param_bytes=param_bytes,
        grad_bytes=grads.get("bytes", 0), optimizer_state_bytes=state_bytes,
        saved_activation_bytes=saved_bytes, step_peaks=step_peaks, step_peak_phases=step_phases, foreach=foreach,
        fused_ops=hidden, scratch_applied=tracker.scratch_applied, kept_scratch_bytes=tracker.kept_bytes
    ), list(tracker.scratch_calls)
