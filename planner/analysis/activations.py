"""Analytic activation memory of one inference forward pass, without real weights.

The model usually lives on the meta device (possibly cast to bf16 and quantized with torchao on meta).
A TorchDispatchMode watches every op: each output whose storage is new is an allocation, and a
weakref.finalize on that storage tells us when the last tensor (or view) referencing it dies. The peak
of the live total is the activation peak; summing layer outputs would overcount because a layer's
input is usually freed once the next layer has consumed it.

Meta tensors report device "meta", which sends device-dependent Python code down paths a real CPU
never takes (torchao's int8 dynamic matmul falls back to an fp32 copy of the weight; the transformer
fast path is skipped). So by default meta tensors are swapped for FakeTensors that claim to be on the
CPU: still no storage, but the same branches as a real CPU run.

torchao tensor subclasses are seen from the inside: ops on them are deferred to the subclass (the mode
returns NotImplemented) and torchao custom ops run their Python decomposition under the mode, so
dequantized weights and quantized activations show up as allocations.

What the tracker cannot see: the internal workspace of fused kernels (LSTM, the transformer encoder
fast path, attention), listed in `ActivationReport.fused_ops` and, for the kernels in planner.analysis.scratch's
SCRATCH_OPS, measured at their shapes and added; and allocator overhead. One hidden
workspace is modeled: reductions that cast their input to a wider `dtype` (see _CASTING_REDUCTIONS).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass, transform_subclass

from planner.analysis.scratch import SCRATCH_OPS, Scratch, op_signature

# Ops whose kernel allocates scratch memory the tracker never sees (only their outputs are visible).
_FUSED_OPS = frozenset({
    "aten.lstm", "aten.gru", "aten.rnn_tanh", "aten.rnn_relu", "aten.mkldnn_rnn", "aten._thnn_fused_lstm_cell",
    "aten._thnn_fused_gru_cell", "aten._transformer_encoder_layer_fwd", "aten._native_multi_head_attention",
    "aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_attention_math",
})

# Reductions given a wider `dtype` than their input first cast the whole input to it inside the kernel
# (measured: int8 weight.sum(dtype=int32) on ComplexNet fc1 grows RSS by 2 GiB, which torchao's int8
# dynamic CPU path does for its uint8 compensation term). The tracker models that hidden copy.
_CASTING_REDUCTIONS = frozenset({"aten.sum", "aten.nansum", "aten.mean", "aten.prod", "aten.cumsum", "aten.cumprod"})


def _hidden_cast_bytes(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> int:
    dtype = kwargs.get("dtype")
    source = args[0] if args else None
    if str(func.overloadpacket) not in _CASTING_REDUCTIONS or dtype is None or not isinstance(source, torch.Tensor):
        return 0
    return 0 if dtype == source.dtype else source.numel() * dtype.itemsize


@dataclass
class ModuleActivation:
    output_bytes: int = 0      # bytes of this module's outputs (largest call if called several times)
    peak_bytes: int = 0        # peak live intermediate bytes while it ran (includes what was alive before)
    transient_bytes: int = 0   # largest allocation made directly in it that is not its output
    calls: int = 0


@dataclass
class ActivationReport:
    peak_bytes: int
    output_bytes: int
    peak_module: str
    per_module: dict[str, ModuleActivation] = field(default_factory=dict)
    fused_ops: list[str] = field(default_factory=list)
    transient_bytes: int = 0
    # kernels with hidden workspace met (planner.analysis.scratch)
    scratch_calls: list[str] = field(default_factory=list)
    scratch_applied: dict[str, int] = field(default_factory=dict)  # op -> largest measured workspace added
    scratch_missing: list[str] = field(default_factory=list)  # ops whose workspace at these shapes is unmeasured


@dataclass
class _Frame:
    name: str
    is_root: bool
    peak: int
    # allocation serial -> bytes, for allocations made while this frame was innermost. Serials, not storage
    # keys, because a freed storage's address is soon reused by the next allocation.
    allocs: dict[int, int] = field(default_factory=dict)


def _storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The real storages behind a tensor; wrapper subclasses (torchao) hold theirs in inner tensors."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [s for name in names for s in _storages(getattr(tensor, name))]
    try:
        return [tensor.untyped_storage()]
    except (RuntimeError, NotImplementedError):  # opaque subclass without a storage: nothing to track
        return []


def storage_keys(tree: Any) -> dict[int, int]:
    """Storage key -> nbytes for every tensor in a pytree; views of one storage count once."""
    keys: dict[int, int] = {}
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            for storage in _storages(leaf):
                keys[storage._cdata] = storage.nbytes()
    return keys


def _defers_to_subclass(args: tuple, kwargs: dict) -> bool:
    """True if an argument is a tensor subclass with its own __torch_dispatch__ (e.g. a torchao weight).

    Returning NotImplemented from the mode then lets the subclass run its implementation with the mode
    still active, so the plain-tensor ops inside it (dequantized weights) are tracked too.
    """
    return any(
        isinstance(leaf, torch.Tensor) and is_traceable_wrapper_subclass(leaf)
        for leaf in pytree.tree_leaves((args, kwargs))
    )


def _has_python_decomposition(func: torch._ops.OpOverload) -> bool:
    # Custom ops (torchao.quantize_affine & co.) are opaque to the mode unless we run their
    # CompositeImplicitAutograd kernel ourselves under the mode.
    return func.namespace not in ("aten", "prim", "prims") and torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(), "CompositeImplicitAutograd")


class LivenessTracker(TorchDispatchMode):
    """Tracks live bytes of storages created by ops during the forward."""

    def __init__(self, preexisting: set[int], scratch: dict[str, Any] | None = None) -> None:
        super().__init__()
        # Measured workspace of kernels the trace cannot see into (planner.analysis.scratch), by call signature; None
        # leaves it out. The signatures met are collected either way, so missing ones can be measured.
        self.scratch = scratch
        self.scratch_calls: dict[str, None] = {}  # signatures of the calls with hidden workspace, in trace order
        self.scratch_applied: dict[str, int] = {}  # op -> largest transient scratch added
        self.scratch_missing: set[str] = set()  # ops met at signatures with no measurement
        self._grown: set[tuple[int, str]] = set()  # (allocation serial, signature) already grown by a kernel
        self.preexisting = set(preexisting)
        self.live: dict[int, int] = {}        # storage key -> bytes
        self.serial: dict[int, int] = {}      # storage key -> serial of the allocation now holding it
        self._next_serial = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_module = ""
        self.stack: list[_Frame] = []
        self.fused_ops: set[str] = set()
        self._finalizers: list[weakref.finalize] = []

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _defers_to_subclass(args, kwargs):
            return NotImplemented
        if _has_python_decomposition(func):
            with self:
                out = func.decompose(*args, **kwargs)
        else:
            self._hidden(_hidden_cast_bytes(func, args, kwargs))
            out = func(*args, **kwargs)
            packet = str(func.overloadpacket)
            if packet in _FUSED_OPS or func.namespace not in ("aten", "prim", "prims"):
                self.fused_ops.add(packet)
        self._record_outputs(out, storage_keys((args, kwargs)))
        self._add_scratch(func, args, kwargs, out)
        return out

    def _add_scratch(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> None:
        """A kernel with measured hidden workspace: its real output sizes, and its transient workspace on top of
        what is live right after it (outputs included), as both coexist."""
        packet = str(func.overloadpacket)
        if packet not in SCRATCH_OPS:
            return
        signature = op_signature(func, args, kwargs)
        if signature is None:
            return
        measured = (self.scratch or {}).get(signature)
        if measured is None:
            self.scratch_missing.add(packet)
            measured = Scratch(0, 0)
        self._first_call(signature, measured)
        self.scratch_calls[signature] = None
        self._grow_inputs(signature, args, kwargs, measured)
        self._grow_outputs(out, measured)
        if measured.transient:
            self._note_peak(self.live_bytes + measured.transient)
            self.scratch_applied[packet] = max(measured.transient, self.scratch_applied.get(packet, 0))

    def _first_call(self, signature: str, measured: Any) -> None:
        """Hook for what a kernel keeps after its first call (training adds it; an inference measurement runs a
        forward before its baseline, so there it is part of the baseline)."""

    def _grow_outputs(self, out: Any, measured: Any) -> None:
        """Outputs the meta kernel makes smaller than the real one: the resident difference lives as long as the
        output does."""
        leaves = [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]
        for leaf, resident in zip(leaves, measured.output_resident, strict=False):
            self._grow(leaf.untyped_storage()._cdata, resident - leaf.untyped_storage().nbytes())

    def _grow_inputs(self, signature: str, args: tuple, kwargs: dict, measured: Any) -> None:
        """Inputs whose pages the kernel touches for the first time (a workspace allocated by one kernel and
        written by another): the growth lives as long as that input does. Once per input and call signature."""
        leaves = [leaf for leaf in pytree.tree_leaves((args, dict(sorted(kwargs.items()))))
                  if isinstance(leaf, torch.Tensor)]  # the order planner.analysis.scratch measured them in
        for leaf, growth in zip(leaves, measured.input_growth, strict=False):
            key = leaf.untyped_storage()._cdata
            allocation = (self.serial.get(key, -1), signature)  # serials: a freed storage's key is reused
            if growth and key in self.live and allocation not in self._grown:
                self._grown.add(allocation)
                self._grow(key, growth)

    def _grow(self, key: int, nbytes: int) -> None:
        if nbytes > 0 and key in self.live:
            self.live[key] += nbytes  # freed with the storage by the finalizer
            self.live_bytes += nbytes
            self._note_peak(self.live_bytes)

    def _record_outputs(self, out: Any, arg_keys: dict[int, int]) -> None:
        for leaf in pytree.tree_leaves(out):
            if not isinstance(leaf, torch.Tensor):
                continue
            for storage in _storages(leaf):
                key = storage._cdata
                if key in self.live or key in self.preexisting:
                    continue  # a view or in-place result: no new memory
                if key in arg_keys:
                    self.preexisting.add(key)  # an untracked input's storage (e.g. a constant), not ours
                    continue
                self._allocate(storage, key)

    def adopt(self, tree: Any) -> None:
        """Count the tensors of `tree` as live allocations made before the trace (freed when they die)."""
        for leaf in pytree.tree_leaves(tree):
            if isinstance(leaf, torch.Tensor):
                for storage in _storages(leaf):
                    key = storage._cdata
                    if key not in self.live:
                        self.preexisting.discard(key)
                        self._allocate(storage, key)

    def _allocate(self, storage: torch.UntypedStorage, key: int) -> None:
        nbytes = storage.nbytes()
        self.live[key] = nbytes
        self.serial[key] = self._next_serial
        self._next_serial += 1
        self.live_bytes += nbytes
        # The callback fires when the StorageImpl dies, i.e. when the last tensor or view on it is gone.
        self._finalizers.append(weakref.finalize(storage, self._free, key))
        if self.stack:
            self.stack[-1].allocs[self.serial[key]] = nbytes
        self._note_peak(self.live_bytes)

    def _hidden(self, nbytes: int) -> None:
        """A buffer allocated and freed inside one kernel: it counts toward peaks and transients only."""
        if nbytes == 0:
            return
        self._note_peak(self.live_bytes + nbytes)
        if self.stack:
            self.stack[-1].allocs[self._next_serial] = nbytes
        self._next_serial += 1  # a serial no output will ever hold

    def replay(self, peak_above_entry: int, largest_scratch: int) -> None:
        """What a memoized layer did the first time (see _memoized_layers): its peak and its largest scratch
        buffer; its output is then allocated for real."""
        self._note_peak(self.live_bytes + peak_above_entry)
        if largest_scratch and self.stack:
            self.stack[-1].allocs[self._next_serial] = largest_scratch
        self._next_serial += 1

    def _note_peak(self, live_bytes: int) -> None:
        for frame in self.stack:
            frame.peak = max(frame.peak, live_bytes)
        if live_bytes > self.peak_bytes:
            self.peak_bytes = live_bytes
            self.peak_module = self.stack[-1].name if self.stack else ""

    def _free(self, key: int) -> None:
        self.live_bytes -= self.live.pop(key, 0)
        self.serial.pop(key, None)

    def detach(self) -> None:
        """Stop listening for frees (the forward's outputs outlive the tracker)."""
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()


@contextlib.contextmanager
def _module_hooks(model: nn.Module, tracker: LivenessTracker,
                  per_module: dict[str, ModuleActivation]) -> Iterator[None]:
    """Global forward hooks that keep the tracker's module stack and fill per-module numbers."""
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    root = id(model)

    def pre(module: nn.Module, _inputs: Any) -> None:
        name = names.get(id(module), f"<{type(module).__name__}>")
        tracker.stack.append(_Frame(name, id(module) == root, tracker.live_bytes))

    def post(module: nn.Module, _inputs: Any, output: Any) -> None:
        frame = tracker.stack.pop()
        outputs = storage_keys(output)
        output_serials = {tracker.serial[key] for key in outputs if key in tracker.serial}
        entry = per_module.setdefault(frame.name, ModuleActivation())
        entry.calls += 1
        entry.output_bytes = max(entry.output_bytes, sum(outputs.values()))
        entry.peak_bytes = max(entry.peak_bytes, frame.peak)
        if not frame.is_root:  # the root's own functional ops are plain activations, not transients
            scratch = [nbytes for serial, nbytes in frame.allocs.items() if serial not in output_serials]
            entry.transient_bytes = max([entry.transient_bytes, *scratch])

    pre_handle = nn.modules.module.register_module_forward_pre_hook(pre)
    post_handle = nn.modules.module.register_module_forward_hook(post, always_call=True)
    try:
        yield
    finally:
        pre_handle.remove()
        post_handle.remove()


@dataclass(frozen=True)
class _Replay:
    peak_above_entry: int
    largest_scratch: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _signature(module: nn.Module, args: tuple) -> tuple[Any, ...]:
    weight, bias = module.weight, getattr(module, "bias", None)
    return (type(module), type(weight), tuple(weight.shape), weight.dtype,
            None if bias is None else (tuple(bias.shape), bias.dtype),
            tuple((tuple(a.shape), a.stride(), a.dtype, a.device) for a in args))


@contextlib.contextmanager
def _memoized_layers(model: nn.Module, tracker: LivenessTracker) -> Iterator[None]:
    """Quantized leaf layers of one signature (type, weight layout, input shapes) allocate identically, so the
    first call of a signature runs and the others replay its peak, scratch and output. Running torchao's
    subclass dispatch on fake tensors for each of a 7B Llama's 225 layers took seconds."""
    memo: dict[tuple[Any, ...], _Replay] = {}
    patched: list[nn.Module] = []

    def memoized(module: nn.Module, original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args) or not tracker.stack:
                return original(*args, **kwargs)
            key = _signature(module, args)
            if key in memo:
                replay = memo[key]
                tracker.replay(replay.peak_above_entry, replay.largest_scratch)
                return torch.empty_strided(replay.shape, replay.stride, dtype=replay.dtype, device=args[0].device)
            frame = tracker.stack[-1]  # pushed for this module by the global pre-hook, so peak starts at entry
            entry = tracker.live_bytes
            out = original(*args)
            if (isinstance(out, torch.Tensor) and not is_traceable_wrapper_subclass(out)
                    and out.untyped_storage().nbytes() == out.numel() * out.element_size()):
                output_serial = tracker.serial.get(out.untyped_storage()._cdata)
                scratch = [nbytes for serial, nbytes in frame.allocs.items() if serial != output_serial]
                memo[key] = _Replay(frame.peak - entry, max(scratch, default=0), tuple(out.shape), out.stride(),
                                    out.dtype)
            return out
        return forward

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (next(module.children(), None) is None and isinstance(weight, torch.Tensor)
                and is_traceable_wrapper_subclass(weight)):
            module.forward = memoized(module, module.forward)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # the class's forward again


def fake_on(tensor: torch.Tensor, mode: Any, device: str) -> torch.Tensor:
    """A storage-less copy of `tensor` that claims to live on `device` (subclasses keep their layout); with mode
    None, a plain tensor on `device` (meta)."""
    if is_traceable_wrapper_subclass(tensor):
        return transform_subclass(tensor, lambda _name, inner: fake_on(inner, mode, device))
    with mode if mode is not None else contextlib.nullcontext():
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)


def fake_state(model: nn.Module, inputs: tuple[torch.Tensor, ...], device: str
               ) -> tuple[Any, dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
    """A FakeTensorMode, then the model's parameters and buffers and the inputs as storage-less FakeTensors
    claiming `device`, for torch.func.functional_call under that mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # import late: it is heavy

    fake_mode = FakeTensorMode()
    state = {name: fake_on(t, fake_mode, device) for name, t in _state(model).items()}
    return fake_mode, state, tuple(fake_on(t, fake_mode, device) for t in inputs)


def fake_forward(model: nn.Module, inputs: tuple[torch.Tensor, ...], device: str = "cpu") -> Any:
    """`model(*inputs)` on storage-less FakeTensors claiming `device`: meta weights, yet the branches (and
    data-dependent checks, which fake tensors let pass where meta tensors raise) of a real run there."""
    fake_mode, state, fake_inputs = fake_state(model, inputs, device)
    # A failing op is logged with a traceback before it raises; the caller reports the error in one line.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with torch.inference_mode(), fake_mode:
            return torch.func.functional_call(model, state, fake_inputs)
    finally:
        fake_log.setLevel(level)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _on_meta(tensors: list[torch.Tensor]) -> bool:
    return any(t.device.type == "meta" for t in tensors)


def activation_peak(model: nn.Module, inputs: tuple[torch.Tensor, ...], *,
                    simulate_device: str | None = "cpu", memoize: bool = True,
                    scratch: dict[str, Any] | None = None) -> ActivationReport:
    """Peak live activation bytes of one `model(*inputs)` under inference_mode.

    Parameters, buffers and inputs are not counted; the outputs are (they are alive at the end).
    With meta tensors and `simulate_device` set, the forward runs on FakeTensors claiming that device so
    device-dependent code paths match a real run there; `simulate_device=None` runs on meta as is.
    """
    state = _state(model)
    fake_mode = None
    if simulate_device is not None and _on_meta([*state.values(), *inputs]):
        fake_mode, state, inputs = fake_state(model, inputs, simulate_device)

    def forward() -> Any:
        return torch.func.functional_call(model, state, inputs) if fake_mode else model(*inputs)

    return traced_call(model, forward, (state, inputs), fake_mode=fake_mode, memoize=memoize, scratch=scratch)[0]


def traced_call(model: nn.Module, call: Callable[[], Any], untracked: Any, *, fake_mode: Any = None,
                live: Any = None, memoize: bool = True, scratch: dict[str, Any] | None = None
                ) -> tuple[ActivationReport, Any]:
    """The liveness report of `call()` (which runs `model`, e.g. through functional_call) and what it returned.

    Storages in the pytree `untracked` (parameters, inputs) are never counted; the tensors of the pytree `live`
    count as live from the start and are subtracted when they die (a KV cache the call replaces by a longer
    one). `fake_mode`: the FakeTensorMode the tensors were made in (planner.analysis.activations.fake_state)."""
    tracker = LivenessTracker(set(storage_keys(untracked)), scratch)
    tracker.adopt(live)
    per_module: dict[str, ModuleActivation] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if fake_mode is not None:
            stack.enter_context(fake_mode)
        stack.enter_context(_module_hooks(model, tracker, per_module))
        if memoize:
            stack.enter_context(_memoized_layers(model, tracker))
        stack.enter_context(tracker)
        try:
            output = call()
        finally:
            tracker.detach()
    report = ActivationReport(
        peak_bytes=tracker.peak_bytes,
        output_bytes=sum(storage_keys(output).values()),
        peak_module=tracker.peak_module,
        per_module=per_module,
        fused_ops=sorted(tracker.fused_ops),
        transient_bytes=max((m.transient_bytes for m in per_module.values()), default=0),
        scratch_calls=list(tracker.scratch_calls),
        scratch_applied=dict(tracker.scratch_applied),
        scratch_missing=sorted(tracker.scratch_missing),
    )
    return report, output


# Runs in a fresh process: real weights, one warm-up forward (one-time allocations: thread pools, kernels),
# then the peak resident growth of a second forward. The malloc settings make glibc hand big freed blocks
# back to the OS, so the baseline after warm-up is not inflated by cached free memory.
