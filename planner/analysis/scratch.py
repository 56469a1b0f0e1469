"""Measured scratch memory of the kernels whose workspace the liveness tracker cannot see.

Some CPU kernels allocate working memory inside the kernel: oneDNN convolution computes in a blocked layout and
reorders into the output, its backward reorders the incoming gradient, the fused attention kernels keep
per-thread buffers. The tracker sees only their outputs. Guessing these sizes from shapes would be a model of
oneDNN's internals; instead each such op is run once at the actual shapes, dtypes and arguments in a fresh
process (`python -m planner.analysis.scratch JOB RESULT`, under planner.measure.isolation's timeout and memory cap),
after a
tiny warm-up of each kernel family (the library's own first-use costs are not the op's). Two figures per call:

- kept: resident growth left behind by the first call once its outputs are freed, less the pages it touched in
  its own inputs (oneDNN keeps scratchpads and primitive caches: about 10 MB after the four convolution calls of
  `zoo:convnet` at batch 8). The calls are measured in the order the trace first meets them, so each figure is
  the growth on top of the calls before, as in a real step; the trace adds each backward call's kept bytes once,
  at its first use, and never frees them (a forward call's are part of the baseline: the measured twin runs one
  forward before it, like the torch worker);
- input growth: pages of an input that the first call touched for the first time (counted with mincore(2)). oneDNN's
  LSTM forward allocates a 66 MB workspace and writes a third of it; its backward writes another 18 MB into it.
  Those pages live as long as the workspace, not forever: counting them as kept double counted them in every later
  step (the +18% of `zoo:lstm` training at batch 64). The trace grows that input's storage instead;
- scratch: peak resident memory during a warm call - resident memory right after it (outputs alive): the transient
  workspace, added on top of what is live right after the op (outputs included), when both coexist;
- output sizes: the real bytes of each output, and the bytes of it resident after the call. Where the meta kernel
  returns less (oneDNN's LSTM forward returns an empty workspace on meta), the trace adds the resident difference
  for as long as that output lives.

Both are cached on disk per machine, keyed by torch version, op and arguments, in
${PLANNER_CACHE_DIR:-~/.cache/planner}.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from planner.measure.isolation import Limits, run_worker
from planner.measure.library import MEASUREMENT_ENV, proc_status_bytes, release_freed_memory, reset_peak
from planner.measure.worker import worker_main

# Under inference_mode the composite ops reach the tracker undecomposed (no autograd key runs their
# decomposition), so inference meets conv2d and lstm where training meets convolution and mkldnn_rnn_layer.
# The same holds for attention (scaled_dot_product_attention), nn.TransformerEncoderLayer's fused fast path, which
# torch takes only without autograd, and max pooling (its CPU kernel computes int64 indices and drops them: 8 bytes
# per output element, 16.8 MB after zoo:convnet's first convolution at batch 8; the bf16 row missed 11% by them).
INFERENCE_OPS = frozenset({"aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.lstm", "aten.gru",
                           "aten.scaled_dot_product_attention", "aten._transformer_encoder_layer_fwd",
                           "aten.max_pool2d"})
SCRATCH_OPS = frozenset({
    "aten.convolution", "aten.convolution_backward",
    "aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_flash_attention_for_cpu_backward",
    "aten.mkldnn_rnn_layer", "aten.mkldnn_rnn_layer_backward",
}) | INFERENCE_OPS
# oneDNN's RNN backward reads the forward's opaque workspace: the child runs that forward first (see _prepare).
# Below this a measured scratch is page noise (the measurement's resolution is one 4 kB page per allocation).
NOISE_BYTES = 64 * 1024
_DTYPES = {str(dtype): dtype for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                            torch.int64, torch.int32, torch.bool, torch.uint8, torch.int8)}


def cache_path() -> Path:
    root = Path(os.environ.get("PLANNER_CACHE_DIR") or Path.home() / ".cache" / "planner")
    return root / f"scratch-v5-torch-{torch.__version__}.json"


def _describe(value: Any) -> Any:
    """A JSON description of one op argument; None-able scalars and lists pass through."""
    if isinstance(value, torch.Tensor):
        if str(value.dtype) not in _DTYPES:
            raise TypeError(f"unsupported dtype {value.dtype}")
        return {"tensor": list(value.shape), "stride": list(value.stride()), "dtype": str(value.dtype)}
    if isinstance(value, list | tuple):
        return [_describe(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.dtype):
        return {"dtype_arg": str(value)}
    raise TypeError(f"unsupported argument {type(value).__name__}")


def op_signature(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> str | None:
    """The cache key of one call: op overload and a description of every argument; None if not describable."""
    try:
        return json.dumps({"op": str(func), "args": _describe(list(args)), "kwargs": {
            name: _describe(value) for name, value in sorted(kwargs.items())}}, sort_keys=True)
    except TypeError:
        return None


@dataclass(frozen=True)
class Scratch:
    transient: int  # workspace during a warm call, beyond the outputs
    kept: int       # resident growth the first call leaves behind (a scratchpad the library keeps)
    # Real storage bytes of each tensor output: a meta kernel may return a smaller placeholder (oneDNN's LSTM
    # workspace, saved for backward, is an empty tensor on meta and tens of MB for real).
    output_sizes: tuple[int, ...] = ()
    # Of those, the bytes really resident after the first call, per output: a kernel may allocate more than it
    # writes, and untouched pages cost no memory (that LSTM workspace: 65.7 MB allocated, 21 MB resident).
    output_resident: tuple[int, ...] = ()
    # Per tensor argument (pytree order of args then kwargs): resident bytes the first call added to it by
    # touching its pages for the first time (the LSTM backward writing into the forward's workspace).
    input_growth: tuple[int, ...] = ()


def load_cache() -> dict[str, Scratch]:
    try:
        return {key: _scratch(value) for key, value in json.loads(cache_path().read_text()).items()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def _scratch(value: dict[str, Any]) -> Scratch:
    return Scratch(int(value["transient"]), int(value["kept"]), *(tuple(int(size) for size in value[name])
                                                                  for name in ("output_sizes", "output_resident",
                                                                               "input_growth")))


def _store(new: dict[str, Scratch]) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {key: dataclasses.asdict(value) for key, value in {**load_cache(), **new}.items()}
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(merged, indent=0))
    temporary.replace(path)


def scratch_bytes(signatures: list[str], timeout_s: float = 600.0) -> tuple[dict[str, Scratch], str | None]:
    """Scratch per signature, from the cache or measured in a fresh process; and why some are missing."""
    known = load_cache()
    missing = [signature for signature in dict.fromkeys(signatures) if signature not in known]  # trace order
    failure = None
    if missing:
        with tempfile.TemporaryDirectory(prefix="planner-scratch-") as workdir:
            result = run_worker({"signatures": missing}, Path(workdir), "scratch",
                                Limits(timeout_s), worker="planner.analysis.scratch", allocator_env=MEASUREMENT_ENV)
        if result.get("status") == "verified":
            measured = {key: _scratch(value) for key, value in result["scratch"].items()}
            _store(measured)
            known.update(measured)
        else:
            failure = result.get("note", "scratch measurement failed")
    return {key: known[key] for key in signatures if key in known}, failure


# ---------------------------------------------------------------------------------------------- the child


def _build(value: Any, generator: torch.Generator) -> Any:
    if isinstance(value, dict) and "tensor" in value:
        dtype = _DTYPES[value["dtype"]]
        shape, stride = value["tensor"], value["stride"]
        # Fill the storage, not the view: an expanded argument (a broadcast mask, stride 0) overlaps itself.
        extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride, strict=True)) if all(shape) else 0
        if dtype.is_floating_point:
            storage = torch.randn(extent, generator=generator, dtype=torch.float32).to(dtype)
        else:
            storage = torch.zeros(extent, dtype=dtype)
        return storage.as_strided(shape, stride)
    if isinstance(value, dict) and "dtype_arg" in value:
        return _DTYPES[value["dtype_arg"]]
    if isinstance(value, list):
        return [_build(item, generator) for item in value]
    return value


def _op(name: str) -> torch._ops.OpOverload:
    namespace, rest = name.split(".", 1)
    packet, _, overload = rest.partition(".")
    return getattr(getattr(getattr(torch.ops, namespace), packet), overload or "default")


def _tensors(tree: Any) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _output_sizes(output: Any) -> tuple[int, ...]:
    return tuple(leaf.untyped_storage().nbytes() for leaf in _tensors(output))


def resident_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the pages of a CPU tensor's storage that are resident (mincore(2)); the storage's own bytes where
    the OS cannot say. Pages shared with a neighbouring allocation at either end count whole."""
    storage = tensor.untyped_storage()
    start, nbytes = storage.data_ptr(), storage.nbytes()
    if nbytes == 0 or tensor.device.type != "cpu":
        return 0
    first = start - start % mmap.PAGESIZE
    length = start + nbytes - first
    pages = (ctypes.c_ubyte * -(-length // mmap.PAGESIZE))()
    try:
        failed = ctypes.CDLL("libc.so.6").mincore(ctypes.c_void_p(first), ctypes.c_size_t(length), pages)
    except OSError:
        failed = True
    if failed:
        return nbytes
    return min(nbytes, sum(page & 1 for page in pages) * mmap.PAGESIZE)


def _per_storage(tensors: list[torch.Tensor]) -> list[int]:
    """Resident bytes per tensor, a storage shared by several tensors counted at its first one only."""
    seen: set[int] = set()
    sizes = []
    for tensor in tensors:
        key = tensor.untyped_storage()._cdata
        sizes.append(0 if key in seen else resident_bytes(tensor))
        seen.add(key)
    return sizes


def warm_up_kernels() -> None:
    """First use of each kernel family at tiny shapes: library initialisation belongs to no op."""
    image = torch.randn(1, 3, 8, 8)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    torch.nn.functional.conv2d(image, weight, padding=1).sum().backward()
    query = torch.randn(1, 2, 4, 8, requires_grad=True)
    torch.nn.functional.scaled_dot_product_attention(query, query, query).sum().backward()
    lstm = torch.nn.LSTM(4, 4, batch_first=True)
    lstm(torch.randn(1, 3, 4))[0].sum().backward()


def _prepare(op: str, args: list[Any]) -> list[Any]:
    """Arguments that must come from another kernel rather than random values."""
    if op == "aten.mkldnn_rnn_layer_backward.default":
        # (input, w1..w4, hx, cx, output, hy, cy, grad_output, grad_hy, grad_cy, reverse, mode, hidden_size,
        #  num_layers, has_biases, train, bidirectional, batch_sizes, batch_first, workspace)
        (inputs, w1, w2, w3, w4, hx, cx, _out, _hy, _cy, *grads, reverse, mode, hidden, layers, biases, train,
         bidirectional, batch_sizes, batch_first, _workspace) = args
        with torch.enable_grad():  # the forward keeps its workspace only for a backward
            output, hy, cy, workspace = torch.ops.aten.mkldnn_rnn_layer(
                inputs, w1, w2, w3, w4, hx, cx, reverse, batch_sizes, mode, hidden, layers, biases, bidirectional,
                batch_first, train)
        return [inputs, w1, w2, w3, w4, hx, cx, output, hy, cy, *grads, reverse, mode, hidden, layers, biases, train,
                bidirectional, batch_sizes, batch_first, workspace]
    return args


def _measure(signature: str, generator: torch.Generator) -> Scratch:
    call = json.loads(signature)
    func = _op(call["op"])
    args = _prepare(call["op"], _build(call["args"], generator))
    kwargs = {name: _build(value, generator) for name, value in call["kwargs"].items()}
    with torch.inference_mode(call["op"].rpartition(".")[0] in INFERENCE_OPS):
        return _measure_call(func, args, kwargs)


def _measure_call(func: torch._ops.OpOverload, args: list[Any], kwargs: dict[str, Any]) -> Scratch:
    inputs = _tensors((args, kwargs))
    release_freed_memory()
    inputs_before = _per_storage(inputs)
    before_first = proc_status_bytes("VmRSS")
    first_output = func(*args, **kwargs)
    output_resident = tuple(_per_storage(_tensors(first_output)))
    input_growth = tuple(max(0, after - before) for after, before in zip(_per_storage(inputs), inputs_before,
                                                                         strict=True))
    del first_output
    release_freed_memory()
    # What stays once the outputs are gone, less the inputs' newly touched pages (they go with the inputs).
    kept = proc_status_bytes("VmRSS") - before_first - sum(input_growth)
    reset_peak()
    output = func(*args, **kwargs)
    transient = proc_status_bytes("VmHWM") - proc_status_bytes("VmRSS")  # the peak beyond what is live after it
    return Scratch(transient if transient > NOISE_BYTES else 0, kept if kept > NOISE_BYTES else 0,
                   _output_sizes(output), output_resident,
                   tuple(growth if growth > NOISE_BYTES else 0 for growth in input_growth))


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    warm_up_kernels()
    generator = torch.Generator().manual_seed(0)
    # Grad mode stays on, as in a training step: oneDNN's LSTM keeps its workspace only then. No input requires
    # grad, so no graph is recorded.
    return {"scratch": {signature: dataclasses.asdict(_measure(signature, generator))
                        for signature in job["signatures"]}}


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], run_job))
