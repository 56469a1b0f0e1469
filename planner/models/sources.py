"""Where the model comes from: parse what the user typed, validate it, and rebuild it on demand.

Accepted specs (see `resolve_source`):

* ``zoo:NAME``: a built-in model from `planner.models.zoo`.
* ``path/to/models.py:build`` or ``package.module:build``: a factory. Calling it runs the user's own code,
  which is what they asked for by naming it. It returns an ``nn.Module`` or ``(module, example_input)``.
* ``model.pt2``: a `torch.export` archive (``torch.export.save``). torch's loader unpickles parts of it, so
  the archive is inspected first (`planner.models.archive_scan.scan_pt2`: no pickled weights/constants, no custom or
  opaque objects, no native code, sane member names and sizes) and loaded with every unpickling forced to
  weights_only; ``--trust-code`` loads it as torch does.
* ``model.ts`` or any TorchScript zip (detected by content): TorchScript is code (it runs at load, in
  __setstate__, and in forward, and can read and write files), so it needs ``--trust-code``.
* ``model.pt``/``.pth``/``.bin`` saved with ``torch.save(model)``: a pickle. Its opcodes are scanned first (only
  tensor rebuild calls and containers; modules only as torch.save creates them; declared storage sizes within the
  file), then it is loaded with ``weights_only=True`` and only if every global it needs is a torch.nn module class
  (or one of a few pure activation functions); anything else needs ``--trust-code``.

Every problem with the user's input becomes a one-line `PlannerError` saying what was wrong and what to do.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import logging
import math
import os
import pickle
import re
import sys
import types
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from planner.core.errors import PlannerError
from planner.core.safe_io import MAX_PATH_CHARS, check_regular_file
from planner.core.text import first_names
from planner.models import archive_scan, hf_folder
from planner.models.archive_scan import ScanRefusal
from planner.models.zoo import ZOO

KINDS = ("zoo", "factory", "hf", "export", "torchscript", "pickle")

_SAFE_ADVICE = ("save it safely: torch.export.save, TorchScript (torch.jit.save), "
                "or a state dict with --weights and a factory (file.py:build).")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "double": torch.float64, "fp64": torch.float64,
    "int64": torch.int64, "long": torch.int64,
    "int32": torch.int32, "int": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}

# Pure tensor functions that torch.save(model) pickles by reference (e.g. TransformerEncoderLayer.activation).
# Allowing a global lets the unpickler call it with arbitrary arguments, so only side-effect-free ones are listed.
_SAFE_FUNCTIONS = frozenset(
    f"{prefix}.{fn}"
    for prefix in ("torch.nn.functional", "torch._C._nn", "torch")
    for fn in ("relu", "relu6", "gelu", "silu", "mish", "tanh", "sigmoid", "leaky_relu", "elu", "selu", "celu",
               "softplus", "hardswish", "hardsigmoid", "hardtanh", "glu", "softmax", "log_softmax")
)
_PARAMETER_CLASSES = frozenset({"Parameter", "Buffer", "UninitializedParameter", "UninitializedBuffer"})

# Where a pickle's globals may be looked up. Only modules `import torch` (and this module) already imported, read
# from sys.modules without importing: importing a named module can itself run code (a global naming
# torch.utils.model_dump.__main__ would start torch's CLI), and torch's lazy module __getattr__ imports too.
_GLOBAL_MODULES = frozenset({"torch", "torch._utils", "torch._tensor", "torch.nn.parameter", "torch.nn.functional",
                             "torch._C._nn", "torch.serialization", "planner.models.zoo"})
_GLOBAL_MODULE_PREFIXES = ("torch.nn.modules.",)

TRUST_FLAG = "--trust-code"
# Rank cap for --input-shape: no model takes 17-dimensional inputs, and torch's own errors for absurd ranks are
# multi-line tracebacks from its logging.
MAX_INPUT_RANK = 16
# The example input must leave room for the model and its activations: refuse one above this share of the
# memory available now, before allocating it.
INPUT_MEMORY_SHARE = 0.25


def _fail(message: str) -> PlannerError:
    """A PlannerError whose text is a single line, whatever the wrapped exception said."""
    return PlannerError(" ".join(message.split()))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    detail = text[0][:200] if text else ""  # torch's messages can embed whole graph nodes
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


@contextlib.contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    """Deterministic random init (so a subprocess rebuilds identical weights) without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------------------------
# Parsing the small options


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """'1,3,256,256' (also '1x3x256x256' or '(1, 3, 256, 256)') → (1, 3, 256, 256)."""
    if text is None:
        return None
    parts = [p for p in re.split(r"[,x×\s]+", text.strip().strip("()[]").lower()) if p]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise _fail(f"--input-shape {text[:80]!r} is not a shape: give positive integers separated by commas, "
                    "e.g. --input-shape 1,3,256,256")
    if len(dims) > MAX_INPUT_RANK:
        raise _fail(f"--input-shape has {len(dims)} dimensions; at most {MAX_INPUT_RANK} are supported, "
                    "e.g. --input-shape 1,3,256,256")
    return dims


def parse_input_dtype(text: str | None) -> str | None:
    """Normalise a dtype name ('fp16', 'torch.int64') to torch's name ('float16', 'int64')."""
    if text is None:
        return None
    key = text.strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        close = difflib.get_close_matches(key, _DTYPES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise _fail(f"--input-dtype {text!r} is not a known dtype; {hint}"
                    f"use one of {', '.join(sorted({str(d).removeprefix('torch.') for d in _DTYPES.values()}))}")
    return str(_DTYPES[key]).removeprefix("torch.")


def _check_batch_size(batch_size: int | None) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise _fail(f"--batch-size {batch_size!r} must be a whole number >= 1, e.g. --batch-size 8")
    return batch_size


# ---------------------------------------------------------------------------------------------------------------
# Looking at files without running them


def _check_file(path: str, what: str) -> Path:
    """A readable, non-empty regular file: a FIFO, device or directory is refused before anything reads it."""
    return check_regular_file(path, what)


def _zip_entries(path: Path, what: str) -> list[str] | None:
    """The archive's entries with the top-level folder stripped, or None if it is not a readable zip.

    Member names and sizes are checked here, for every kind of zip, before any loader opens it."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    try:
        archive_scan.check_zip_members(infos, path.stat().st_size)
    except ScanRefusal as exc:
        raise _fail(f"{what} {path} {exc}") from None
    return [i.filename.split("/", 1)[1] if "/" in i.filename else i.filename for i in infos]


def detect_format(path: Path, what: str = "model file") -> str:
    """'export' | 'torchscript' | 'pickle' | 'pickle-legacy', judged by content (suffixes lie)."""
    entries = _zip_entries(path, what)
    with path.open("rb") as fh:
        head = fh.read(4)
    if entries is None:
        if head.startswith(b"PK"):
            raise _fail(f"{what} {path} is a damaged zip archive (truncated or corrupt); re-save or re-download it")
        if head[:1] == b"\x80":  # pickle protocol opcode: torch.save(..., _use_new_zipfile_serialization=False)
            return "pickle-legacy"
        raise _fail(f"{what} {path} is not a file PyTorch can read (not a torch.save, TorchScript or torch.export "
                    "archive); save the model with torch.export.save or torch.jit.save")
    if "constants.pkl" in entries and any(e.startswith("code/") for e in entries):
        return "torchscript"
    if "archive_format" in entries or any(e.startswith("models/") or "exported_program" in e for e in entries):
        return "export"
    if "data.pkl" in entries:
        return "pickle"
    raise _fail(f"{what} {path} is a zip archive but not a PyTorch one (no data.pkl, TorchScript code or export "
                "model inside); save the model with torch.export.save, torch.jit.save or torch.save")


def _import_torch_global(name: str) -> Any:
    """Resolve 'torch.nn.modules.linear.Linear' from an already-imported module on the explicit list, or None.

    Nothing is imported: see _GLOBAL_MODULES."""
    module_name, _, attr = name.rpartition(".")
    if not (module_name in _GLOBAL_MODULES or module_name.startswith(_GLOBAL_MODULE_PREFIXES)):
        return None
    module = sys.modules.get(module_name)
    # vars(), not getattr: a module-level __getattr__ (torch has one) may import submodules.
    return vars(module).get(attr) if isinstance(module, types.ModuleType) else None


def _is_allowed_global(name: str) -> bool:
    """Globals a module pickle may use: torch.nn module classes, parameters and pure activation functions.

    Module classes are safe because unpickling them is __new__ + __setstate__(dict): no __init__, no user code.
    planner.models.zoo classes are our own modules, so `torch.save(zoo model)` files load too.
    """
    if name in _SAFE_FUNCTIONS:
        return _import_torch_global(name) is not None
    obj = _import_torch_global(name)
    if not isinstance(obj, type):
        return False
    if obj.__module__ == "torch.nn.parameter":
        return obj.__name__ in _PARAMETER_CLASSES
    # Check where the class really lives, so an alias re-exported under torch.nn.modules can't sneak in.
    defined_in_nn = obj.__module__.startswith("torch.nn.modules.") or obj.__module__ == "planner.models.zoo"
    return defined_in_nn and issubclass(obj, nn.Module)


def _refuse_pickle(display: str, needed: list[str], weights: bool) -> PlannerError:
    needs = needed[0] + (f" (and {len(needed) - 1} more)" if len(needed) > 1 else "")
    label = f"--weights {display}" if weights else display
    return _fail(f"{label} is a pickle that needs {needs} to load; loading it would run code from the file. "
                 f"Re-run with {TRUST_FLAG} if you trust it, or {_pickle_advice(weights)}")


def _pickle_advice(weights: bool) -> str:
    return ("a weights file should be a plain state dict: torch.save(model.state_dict(), path) or safetensors."
            if weights else _SAFE_ADVICE)


def _may_construct(name: str) -> bool:
    """A class a pickle may create with NEWOBJ and no arguments: the module classes _is_allowed_global allows."""
    return isinstance(_import_torch_global(name), type) and _is_allowed_global(name)


def _scan_pickle_file(path: Path, display: str, *, legacy: bool, weights: bool) -> None:
    """Refuse, before torch.load allocates anything, a pickle that calls beyond what torch.save writes or declares
    storages larger than the file holds (bytearray(3e9), nn.Linear(30000, 30000) via REDUCE, zip bombs)."""
    label = f"--weights {display}" if weights else display
    try:
        if legacy:
            with path.open("rb") as stream:
                archive_scan.scan_legacy_pickle(stream, path.stat().st_size, may_construct=_may_construct,
                                                resolve=_import_torch_global)
        else:
            with zipfile.ZipFile(path) as archive:
                archive_scan.scan_torch_zip(archive, path.stat().st_size, may_construct=_may_construct,
                                            resolve=_import_torch_global)
    except ScanRefusal as exc:
        if exc.call is not None and not _weights_only_allows(exc.call):
            raise _refuse_pickle(display, [exc.call], weights) from None  # code: say which global, offer trust
        raise _fail(f"{label} {exc}. Re-run with {TRUST_FLAG} only if you trust it, or "
                    f"{_pickle_advice(weights)}") from None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _fail(f"{label} could not be read ({_first_line(exc)}); re-save or re-download it") from None


def _weights_only_allows(name: str) -> bool:
    """Whether a weights_only load could resolve `name` (ours or torch's allowlist): then a refused call to it is
    an allocation risk, not code."""
    from torch._weights_only_unpickler import _get_allowed_globals

    return _is_allowed_global(name) or name in _get_allowed_globals() or _import_torch_global(name) is not None


def _unsafe_globals(path: Path, display: str) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable archive
        raise _fail(f"{display} could not be read as a torch.save archive ({_first_line(exc)}); "
                    "re-save or re-download it") from None


def _weights_only_load(path: Path, display: str, *, legacy: bool, weights: bool) -> Any:
    """torch.load(weights_only=True) with exactly the allowed globals the file needs; never runs file code."""
    if not legacy:
        needed = _unsafe_globals(path, display)
        refused = [n for n in needed if not _is_allowed_global(n)]
        if refused:
            raise _refuse_pickle(display, refused, weights)
        _scan_pickle_file(path, display, legacy=False, weights=weights)
        allowed = [_import_torch_global(n) for n in needed]
        with torch.serialization.safe_globals(allowed):
            return _torch_load(path, display, weights_only=True, mmap=True)
    _scan_pickle_file(path, display, legacy=True, weights=weights)
    # torch has no up-front global listing for legacy (non-zip) files; the weights_only unpickler names the first
    # global it refuses, without running it, so add allowed ones one at a time.
    allowed_names: list[str] = []
    for _ in range(500):
        try:
            # warnings: torch complains about pickle protocols it didn't write; the outcome is reported anyway.
            with torch.serialization.safe_globals([_import_torch_global(n) for n in allowed_names]), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))
            if match is None:
                raise _fail(f"{display} is a pickle that weights_only loading cannot read safely; re-save it with "
                            f"torch.save (zip format) or {_SAFE_ADVICE}") from None
            # torch prints builtins bare ("exec"); name them fully so the user sees what the file wanted.
            name = match.group(1) if "." in match.group(1) else f"builtins.{match.group(1)}"
            if not _is_allowed_global(name) or name in allowed_names:
                raise _refuse_pickle(display, [name], weights) from None
            allowed_names.append(name)
        except Exception as exc:  # noqa: BLE001 - corrupt data: report, don't trace back
            raise _fail(f"{display} could not be loaded ({_first_line(exc)}); re-save or re-download it") from None
    raise _fail(f"{display} needs too many globals to load safely; {_SAFE_ADVICE}")


def _torch_load(path: Path, display: str, *, weights_only: bool, mmap: bool) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not weights_only:
            raise _fail(f"{display} is a damaged pickle ({_first_line(exc)}); re-save or re-download it") from None
        # The scan said the globals were fine, so this is a pickle weights_only can't parse; don't show torch's
        # multi-paragraph advice.
        raise _fail(f"{display} is a pickle that weights_only loading cannot read safely; "
                    f"re-run with {TRUST_FLAG} if you trust it, or {_SAFE_ADVICE}") from None
    except (AttributeError, ImportError) as exc:
        # A trusted pickle refers to classes by module path; the module that defined them must be importable here.
        raise _fail(f"{display} refers to a class that cannot be imported here ({_first_line(exc)}); put the module "
                    f"that defines it on PYTHONPATH, or {_SAFE_ADVICE}") from None
    except Exception as exc:  # noqa: BLE001 - truncated members, bad CRC, unknown storage types...
        raise _fail(f"{display} could not be loaded ({_first_line(exc)}); re-save or re-download it") from None


def _load_pickle(path: Path, display: str, *, trust: bool, weights: bool = False) -> Any:
    legacy = detect_format(path, "--weights" if weights else "model file") == "pickle-legacy"
    if trust:
        return _torch_load(path, display, weights_only=False, mmap=not legacy)
    return _weights_only_load(path, display, legacy=legacy, weights=weights)


# ---------------------------------------------------------------------------------------------------------------
# State dicts


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _extract_state_dict(obj: Any, display: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or a training checkpoint {'state_dict': ...} / {'model': ...}."""
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    raise _fail(f"--weights {display} is not a state dict (a dict of tensors, or a checkpoint with a 'state_dict' "
                "or 'model' key); save it with torch.save(model.state_dict(), path) or safetensors")


def load_weights(path: str, *, trust_code: bool = False, display: str | None = None) -> dict[str, torch.Tensor]:
    """Read a --weights file (.safetensors, or a torch.save state dict) into a cpu state dict."""
    display = display or path
    p = _check_file(path, "--weights")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError, header errors...
            raise _fail(f"--weights {display} is not a readable safetensors file ({_first_line(exc)}); "
                        "re-save or re-download it") from None
    fmt = detect_format(p, "--weights")
    if fmt in ("export", "torchscript"):
        raise _fail(f"--weights {display} is a whole {'torch.export' if fmt == 'export' else 'TorchScript'} model, "
                    f"not weights; pass it as the model instead: planner {display}")
    return _extract_state_dict(_load_pickle(p, display, trust=trust_code, weights=True), display)


def _strip_wrapper_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """DataParallel/DDP checkpoints prefix every key with 'module.'; drop it when the model has no such prefix."""
    if state and not (state.keys() & expected) and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return state


def check_weights_match(model: nn.Module, state: dict[str, torch.Tensor], display: str) -> dict[str, torch.Tensor]:
    """Compare names and shapes (works on a meta model) and explain the first few differences."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = _strip_wrapper_prefix(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} is {list(state[k].shape)} in the file but {list(expected[k])} in the model"
              for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = [f"{label} {first_names(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch:", shapes)) if items]
    if problems:
        raise _fail(f"--weights {display} does not match the model: {'; '.join(problems)}; "
                    "check that the weights belong to this model")
    return state


# ---------------------------------------------------------------------------------------------------------------
# Factories


def _py_module_name(path: Path) -> str:
    # A stable, unique name per file so two different models.py files don't collide in sys.modules.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return f"_planner_user_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{digest}"


def _import_py_file(path: Path, display: str) -> ModuleType:
    name = _py_module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise _fail(f"{display} cannot be imported as a Python file; check the path")
    module = importlib.util.module_from_spec(spec)
    # Like `python models.py`: the file may import its neighbours.
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[name]
        raise _fail(f"{display} has a syntax error at line {exc.lineno}: {exc.msg}; fix the file") from None
    except BaseException as exc:  # noqa: BLE001 - the user's module failed while importing; SystemExit included
        del sys.modules[name]
        if isinstance(exc, KeyboardInterrupt):
            raise  # Ctrl-C during the import is an interrupt, not a broken file
        raise _fail(f"importing {display} failed with {_first_line(exc)}; fix the file") from None
    return module


def _import_package_module(module_name: str, root: str | None, display: str) -> ModuleType:
    extra = [p for p in (root, os.getcwd()) if p]
    for attempt in range(len(extra) + 1):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only retry when the missing module is ours; a missing dependency inside it is the user's to fix.
            if exc.name is None or not module_name.startswith(exc.name) or attempt == len(extra):
                raise _fail(f"{display}: cannot import {module_name} ({_first_line(exc)}); check the module name, "
                            "or pass a file path like models.py:build") from None
            if extra[attempt] not in sys.path:
                sys.path.insert(0, extra[attempt])
            importlib.invalidate_caches()
        except BaseException as exc:  # noqa: BLE001 - user code raised during import
            if isinstance(exc, KeyboardInterrupt):
                raise  # Ctrl-C during the import is an interrupt, not a broken module
            raise _fail(f"importing {module_name} failed with {_first_line(exc)}; fix the module") from None
    raise AssertionError("unreachable")


def import_function(target: str, attr: str, display: str) -> Callable[..., Any]:
    """The function `attr` of a Python file (`target` ends in .py) or an importable module, with the same checks
    and messages as a model factory (used for --eval's function too)."""
    if target.endswith(".py"):
        module = _import_py_file(Path(target), display)
    else:
        module = _import_package_module(target, None, display)
    return _get_factory(module, attr, display)


def _package_root(module: ModuleType, module_name: str) -> str | None:
    """The sys.path entry the module was found under, so a subprocess with another cwd can import it too."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    root = Path(file).resolve().parent
    depth = module_name.count(".") + (1 if Path(file).name == "__init__.py" else 0)
    for _ in range(depth):
        root = root.parent
    return str(root)


def _get_factory(module: ModuleType, attr: str, display: str) -> Callable[[], Any]:
    factory = getattr(module, attr, None)
    if factory is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"callables there: {first_names(sorted(names), 8)}"
        raise _fail(f"{display}: no factory named {attr!r}; {hint}")
    if not callable(factory):
        raise _fail(f"{display}: {attr} is a {type(factory).__name__}, not a function; name a function that "
                    "returns the model")
    return factory


def _as_example(value: Any, display: str) -> tuple[torch.Tensor, ...]:
    items = value if isinstance(value, (tuple, list)) else (value,)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise _fail(f"{display} returned an example input that is not a tensor or a tuple of tensors; "
                    "return (model, torch.randn(...)) or (model, (tensor1, tensor2))")
    return tuple(items)


def _call_factory(factory: Callable[[], Any], display: str) -> tuple[nn.Module, tuple[torch.Tensor, ...] | None]:
    try:
        with _seeded():
            result = factory()
    except PlannerError:
        raise
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise _fail(f"{display} raised {_first_line(exc)}; fix the factory") from None
    if isinstance(result, nn.Module):
        return result, None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        return result[0], _as_example(result[1], display)
    raise _fail(f"{display} returned {type(result).__name__}; a factory must return an nn.Module or "
                "(nn.Module, example_input)")


# ---------------------------------------------------------------------------------------------------------------
# Example inputs


def _random_like(shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic data: randn for floats; for integers, the known example's value range (token ids stay
    inside the vocabulary), else zeros, which every embedding accepts."""
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype != torch.bool and like is not None and like.device.type != "meta" and like.numel() > 0 \
            and not like.dtype.is_floating_point and like.dtype != torch.bool:
        low, high = int(like.min()), int(like.max())
        return torch.randint(low, high + 1, shape, generator=gen, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _real(t: torch.Tensor) -> torch.Tensor:
    # A factory run under torch.device("meta") hands back meta example inputs: replace them with real data.
    if t.device.type == "meta":
        return _random_like(tuple(t.shape), t.dtype)
    return t.detach().cpu()


def _check_input_bytes(planned: list[tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Refuse an example input that would take more than INPUT_MEMORY_SHARE of the memory available now,
    before allocating it: a typo like --batch-size 1000000 would otherwise ask for hundreds of GB."""
    from planner.core.units import format_bytes
    from planner.measure.isolation import available_memory_bytes

    needed = sum(math.prod(shape) * kind.itemsize for shape, kind in planned)
    available = available_memory_bytes()
    if available is None or needed <= available * INPUT_MEMORY_SHARE:
        return
    shapes = ", ".join("x".join(str(d) for d in shape) for shape, _ in planned)
    raise _fail(f"the example input ({shapes}) would take {format_bytes(needed)}, more than "
                f"{INPUT_MEMORY_SHARE:.0%} of the {format_bytes(available)} of memory available; "
                "use a smaller --input-shape or --batch-size")


def _rebatch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Change dim 0 by cycling the existing rows, so real example data is kept."""
    if t.dim() == 0 or t.shape[0] == batch:
        return t
    if t.shape[0] == 0:
        return _random_like((batch, *t.shape[1:]), t.dtype)
    return t[torch.arange(batch) % t.shape[0]]


# ---------------------------------------------------------------------------------------------------------------
# The source


@dataclass
class ModelSource:
    """A validated model source that can build fresh copies of the model (also in a subprocess, via JSON)."""

    spec: str
    kind: str
    weights: str | None = None
    # The user said the model file may run code: a pickle that needs arbitrary globals, TorchScript, a .pt2 with
    # pickled members.
    trust_code: bool = False
    input_shape: tuple[int, ...] | None = None
    input_dtype: str | None = None
    batch_size: int | None = None
    # Absolute model file / factory .py / package root, so a subprocess with another cwd finds the same thing.
    path: str | None = None
    _known_inputs: tuple[torch.Tensor, ...] | None = field(default=None, init=False, repr=False, compare=False)
    _inputs_looked_up: bool = field(default=False, init=False, repr=False, compare=False)
    # Set when the example input's values had to be made up (a factory that created it on meta).
    input_note: str | None = field(default=None, init=False, repr=False, compare=False)

    # -- identity -----------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        if self.kind == "zoo":
            return self.spec.removeprefix("zoo:")
        if self.kind == "factory":
            return self.spec.rsplit(":", 1)[1]
        if self.kind == "hf":
            return Path(self.spec.removeprefix("hf:").rstrip("/")).name
        return Path(self.spec).stem

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec, "kind": self.kind, "weights": self.weights, "trust_code": self.trust_code,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "input_dtype": self.input_dtype, "batch_size": self.batch_size, "path": self.path,
        }

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> ModelSource:
        shape = d.get("input_shape")
        return ModelSource(
            spec=d["spec"], kind=d["kind"], weights=d.get("weights"),
            # "trust_pickle": the key's name before TorchScript needed the same trust (older JSON still reads).
            trust_code=bool(d.get("trust_code", d.get("trust_pickle"))),
            input_shape=tuple(int(x) for x in shape) if shape is not None else None,
            input_dtype=d.get("input_dtype"), batch_size=d.get("batch_size"), path=d.get("path"),
        )

    # -- building -----------------------------------------------------------------------------------------------

    def build(self, device: str = "cpu") -> nn.Module:
        """A fresh model in eval() mode.

        On "meta", zoo models and factories are built weightless; export/TorchScript/pickle files can't be, so
        they load on cpu (mmap'd where torch allows). Weights are loaded (strict) unless device is "meta".
        """
        meta = torch.device(device).type == "meta"
        model = self._build_raw(meta)
        if self.weights is not None and not meta:
            self._load_weights_into(model)
        if not meta and torch.device(device).type != "cpu":
            model = model.to(device)
        return _eval(model)

    def _build_raw(self, meta: bool) -> nn.Module:
        if self.kind == "zoo":
            return _build_callable(ZOO[self.name].build, meta)
        if self.kind == "factory":
            # The example input always comes from the meta call (see _lookup_inputs), so inputs don't depend on
            # whether the model was built before or after asking for them.
            return self._call_factory(meta)[0]
        if self.kind == "hf":
            return hf_folder.build(self._file(), self.spec, self.trust_code, meta)
        return self._load_file()

    def _factory(self) -> Callable[[], Any]:
        target, attr = self.spec.rsplit(":", 1)
        if target.endswith(".py"):
            module = _import_py_file(Path(self.path or target), target)
        else:
            module = _import_package_module(target, self.path, self.spec)
        return _get_factory(module, attr, self.spec)

    def _call_factory(self, meta: bool) -> tuple[nn.Module, tuple[torch.Tensor, ...] | None]:
        factory = self._factory()
        if meta:
            try:
                with torch.device("meta"):
                    return _call_factory(factory, self.spec)
            except PlannerError:
                # Some factories can't run on meta (they compute with tensors or load files); build on cpu and
                # move to meta, which costs memory once but still gives the caller a weightless model.
                model, example = _call_factory(factory, self.spec)
                return model.to("meta"), example
        model, example = _call_factory(factory, self.spec)
        if example is not None and (self.input_note or not self._inputs_looked_up):
            self._remember_inputs(example)  # the real call gives the real values a meta call could not
        return model, example

    def _file(self) -> Path:
        return Path(self.path or self.spec)

    def _load_file(self) -> nn.Module:
        path, display = self._file(), self.spec
        if self.kind == "export":
            model = quantizable_graph_module(_load_export(path, display, self.trust_code).module())
        elif self.kind == "torchscript":
            model = _load_torchscript(path, display, self.trust_code)
        else:
            model = _load_pickle(path, display, trust=self.trust_code)
            if not isinstance(model, nn.Module):
                raise _not_a_module(display, model)
        return model

    def _load_weights_into(self, model: nn.Module) -> None:
        assert self.weights is not None
        state = check_weights_match(model, load_weights(self.weights, trust_code=self.trust_code),
                                    self.weights)
        try:
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # noqa: BLE001 - e.g. dtype that can't be copied
            raise _fail(f"--weights {self.weights} could not be loaded into the model ({_first_line(exc)})") from None

    # -- example inputs -----------------------------------------------------------------------------------------

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Deterministic cpu inputs: --input-shape/--input-dtype, else the model's own example; --batch-size
        replaces dim 0 of each."""
        known = self._known()
        dtype = _DTYPES[self.input_dtype] if self.input_dtype else None
        _check_input_bytes(self._planned_inputs(known, dtype))
        if self.input_shape is not None:
            like = known[0] if known else None
            first = _random_like(self.input_shape, dtype or (like.dtype if like is not None else torch.float32), like)
            inputs = (first, *(known[1:] if known else ()))
        elif known is not None:
            inputs = known
            if dtype is not None and inputs[0].dtype != dtype:
                inputs = (_random_like(tuple(inputs[0].shape), dtype, inputs[0]), *inputs[1:])
        else:
            raise _fail(f"{self.spec}: no example input is known for this model; pass --input-shape "
                        "(e.g. --input-shape 1,3,224,224) and, for token ids, --input-dtype int64")
        if self.batch_size is not None:
            inputs = tuple(_rebatch(t, self.batch_size) for t in inputs)
        return tuple(t.clone() for t in inputs)

    def _planned_inputs(self, known: tuple[torch.Tensor, ...] | None,
                        dtype: torch.dtype | None) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of each example input example_inputs() is about to create, before it creates them."""
        planned = [(tuple(t.shape), t.dtype) for t in known] if known else []
        if self.input_shape is not None:
            first_dtype = dtype or (planned[0][1] if planned else torch.float32)
            planned = [(self.input_shape, first_dtype), *planned[1:]]
        elif planned and dtype is not None:
            planned[0] = (planned[0][0], dtype)
        if self.batch_size is not None:
            planned = [((self.batch_size, *shape[1:]) if shape else shape, kind) for shape, kind in planned]
        return planned

    def _known(self) -> tuple[torch.Tensor, ...] | None:
        if not self._inputs_looked_up:
            self._remember_inputs(self._lookup_inputs())
        return self._known_inputs

    def _remember_inputs(self, inputs: tuple[torch.Tensor, ...] | None) -> None:
        self.input_note = None
        if inputs is not None and any(t.device.type == "meta" for t in inputs) and self.input_shape is None:
            self.input_note = ("the factory made its example input on the meta device (the planner calls factories "
                               "there to build without weights), so its values were synthesized: normal floats, "
                               "zeros for integers. Create it with device='cpu' to keep real values.")
            self._inputs_looked_up = True
        self._known_inputs = tuple(_real(t) for t in inputs) if inputs is not None else None
        self._inputs_looked_up = True

    def _lookup_inputs(self) -> tuple[torch.Tensor, ...] | None:
        if self.kind == "zoo":
            batch = self.batch_size or 1
            one_row = ZOO[self.name].example_input(1)
            _check_input_bytes([((batch, *t.shape[1:]), t.dtype) for t in one_row])  # before building it
            return ZOO[self.name].example_input(batch)
        if self.kind == "factory":
            return self._call_factory(meta=True)[1]
        if self.kind == "hf":
            return hf_folder.example_inputs(hf_folder.read_config(self._file(), self.spec), self.spec)
        if self.kind == "export":
            return _export_example_inputs(_load_export(self._file(), self.spec, self.trust_code))
        return None


def _eval(model: nn.Module) -> nn.Module:
    try:
        return model.eval()
    except NotImplementedError:
        # ExportedProgram.module() refuses train/eval switches: its mode was fixed when it was exported.
        return model


def _build_callable(builder: Callable[[], nn.Module], meta: bool) -> nn.Module:
    with torch.device("meta") if meta else contextlib.nullcontext(), _seeded():
        return builder()


def _not_a_module(display: str, obj: Any) -> PlannerError:
    if _is_state_dict(obj) or (isinstance(obj, Mapping) and any(_is_state_dict(obj.get(k))
                                                                for k in ("state_dict", "model"))):
        return _fail(f"{display} holds a state dict (weights only), not a model; a state dict needs a factory that "
                     f"builds the model: use file.py:factory --weights {display}")
    return _fail(f"{display} holds a {type(obj).__name__}, not an nn.Module; save the model itself with "
                 "torch.export.save or torch.jit.save")


def _export_itemsize(code: Any) -> int | None:
    """Bytes per element of a dtype as torch.export's JSON numbers it, or None for an unknown code."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    dtype = _SERIALIZE_TO_TORCH_DTYPE.get(code) if isinstance(code, int) else None
    return dtype.itemsize if isinstance(dtype, torch.dtype) else None


def _scan_export(path: Path, display: str) -> None:
    """Inspect a .pt2 before torch.export.load reads it (planner.models.archive_scan.scan_pt2)."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive_scan.scan_pt2(archive, path.stat().st_size, itemsize_of=_export_itemsize,
                                  resolve=_import_torch_global)
    except ScanRefusal as exc:
        raise _fail(f"{display} {exc}. Re-run with {TRUST_FLAG} only if you trust it") from None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _fail(f"{display} could not be read ({_first_line(exc)}); re-export it") from None


def _refuse_unpickling(*args: Any, **kwargs: Any) -> Any:
    raise pickle.UnpicklingError("pickled objects in a .pt2 file are not loaded without --trust-code")


@contextlib.contextmanager
def _weights_only_unpickling() -> Iterator[None]:
    """While torch.export.load runs: every torch.load it makes is weights_only, and its plain pickle.loads
    (opaque constants) and torchbind loader (custom objects) refuse.

    scan_pt2 already refused archives that would reach those calls; this holds even if the scan missed a path.
    The loader calls them through module attributes, so swapping the attributes for the duration covers every
    call site; the planner loads one model at a time in one thread."""
    from torch.export.pt2_archive import _package

    original_load = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original_load(*args, **kwargs)

    swaps = [(torch, "load", weights_only_load), (torch._C, "_pickle_load_obj", _refuse_unpickling),
             (_package, "pickle", types.SimpleNamespace(loads=_refuse_unpickling))]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    try:
        for owner, name, replacement in swaps:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch.export.load logs whole tracebacks (log.warning(exc_info=True)) on a damaged archive before it
    raises; the user gets one line from us instead."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _load_export(path: Path, display: str, trust_code: bool = False) -> torch.export.ExportedProgram:
    # torchao registers the tensor subclasses and ops quantized graphs refer to; without it loading fails.
    with contextlib.suppress(ImportError):
        import torchao  # noqa: F401
    if not trust_code:
        _scan_export(path, display)
    try:
        with _quiet_torch():
            if trust_code:
                return torch.export.load(str(path))
            # load_pt2 is what torch.export.load runs first; called directly, a damaged archive raises its own
            # error instead of "see the warnings above" from the fallback to the old format, which unpickles
            # (scan_pt2 refused old-format archives already).
            from torch.export.pt2_archive._package import load_pt2

            with _weights_only_unpickling():
                programs = load_pt2(str(path)).exported_programs
            if "model" not in programs:
                raise _fail(f"{display} holds no exported program named 'model'; save it with torch.export.save")
            return programs["model"]
    except PlannerError:
        raise
    except Exception as exc:  # noqa: BLE001 - version skew, corrupt members, missing custom ops
        raise _fail(f"{display} could not be loaded with torch.export.load ({_first_line(exc)}); re-export it with "
                    f"torch {torch.__version__.split('+')[0]}") from None


def quantizable_graph_module(module: nn.Module) -> nn.Module:
    """Let layer-type recipes see an exported graph's layers: name each parameter holder after the layer
    it came from (`original_name`, as TorchScript does, read from the graph's nn_module_stack), and call
    linear through F.linear, where torchao's tensor subclasses intercept it (aten.linear would decompose
    into ops they do not implement)."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return module
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.linear.default:
            node.target = torch.nn.functional.linear
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            continue
        path, type_name = list(stack.values())[-1]
        holder = _submodule_or_none(module, path)
        if holder is not None and holder is not module and not hasattr(holder, "original_name"):
            holder.original_name = str(type_name).rsplit(".", 1)[-1]
    module.recompile()
    return module


def _submodule_or_none(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None


def _export_example_inputs(ep: torch.export.ExportedProgram) -> tuple[torch.Tensor, ...] | None:
    stored = getattr(ep, "example_inputs", None)
    if not stored:
        return None
    args, kwargs = stored
    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        return None  # only plain positional tensors can be replayed
    return tuple(args)


def _load_torchscript(path: Path, display: str, trust_code: bool = False) -> nn.Module:
    # TorchScript is code: __setstate__ runs at load and forward runs later, and both may call ops such as
    # torch.from_file(path, shared=True), which creates and writes files. We refuse rather than scan the code for
    # such ops because a denylist of TorchScript ops (file, IPC, custom ops a library registers) cannot be shown
    # to be complete; the user decides with --trust-code.
    if not trust_code:
        raise _fail(f"{display} is TorchScript, which is code: it runs when loaded and in forward and can create "
                    f"or overwrite files. Re-run with {TRUST_FLAG} if you trust it, or save the model with "
                    "torch.export.save (.pt2)")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - corrupt archive, unknown ops
        raise _fail(f"{display} could not be loaded as TorchScript ({_first_line(exc)}); re-save it with "
                    "torch.jit.save") from None


# ---------------------------------------------------------------------------------------------------------------
# resolve_source


_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def _zoo_source(spec: str) -> str:
    name = spec.removeprefix("zoo:")
    if name not in ZOO:
        close = difflib.get_close_matches(name, ZOO, n=2)
        hint = f"did you mean {' or '.join('zoo:' + c for c in close)}? " if close else ""
        raise _fail(f"unknown zoo model {name!r}; {hint}known: {', '.join('zoo:' + n for n in ZOO)}")
    return name


def split_function_spec(spec: str) -> tuple[str, str] | None:
    """('models.py', 'build') or ('pkg.mod', 'build') when the spec names a factory, else None."""
    if ":" not in spec:
        return None
    target, attr = spec.rsplit(":", 1)
    if target.endswith(".py") or re.fullmatch(rf"{_IDENT}(\.{_IDENT})*", target):
        if not re.fullmatch(_IDENT, attr):
            raise _fail(f"{spec}: {attr!r} is not a function name; write it as {target}:build")
        return target, attr
    return None


def _factory_path(target: str, spec: str) -> str | None:
    if target.endswith(".py"):
        return str(_check_file(target, "factory file").resolve())
    module = _import_package_module(target, None, spec)
    return _package_root(module, target)


def _is_file(spec: str) -> bool:
    # os.path answers False for names the OS refuses (too long, a NUL inside); Path.is_file raises on some.
    return os.path.isfile(spec)


def _file_kind(spec: str) -> tuple[str, Path]:
    if len(spec) > MAX_PATH_CHARS:
        _check_file(spec, "model file")  # one line giving the length, not the 5000-character path
    if not os.path.exists(spec):
        close = difflib.get_close_matches(spec, ZOO, n=1)
        hint = f"; did you mean zoo:{close[0]}?" if close else \
            "; give a model file (.pt2, .ts, .pt), zoo:NAME, or a factory like models.py:build"
        raise _fail(f"model file {spec}: no such file{hint}")
    path = _check_file(spec, "model file")
    if path.suffix == ".py":
        raise _fail(f"{spec} is a Python file; name the function that builds the model, e.g. {spec}:build")
    if path.suffix == ".safetensors":
        raise _fail(f"{spec} holds weights only, not a model; use a factory with it: models.py:build --weights {spec}")
    fmt = detect_format(path)
    return ("pickle" if fmt == "pickle-legacy" else fmt), path.resolve()


def _validate_weights(source: ModelSource) -> None:
    """Load the weights once and compare them with a (meta where possible) build, so mismatches show up now."""
    assert source.weights is not None
    state = load_weights(source.weights, trust_code=source.trust_code)
    check_weights_match(source.build("meta"), state, source.weights)


def resolve_source(spec: str, *, weights: str | None = None, trust_code: bool = False,
                   input_shape: str | None = None, input_dtype: str | None = None,
                   batch_size: int | None = None, weightless: bool = False) -> ModelSource:
    """Parse and validate everything the user gave; raise a one-line PlannerError for anything wrong.
    weightless: the command never loads weights (--analytic-only, inspect), so a Hugging Face folder may hold
    config.json alone.

    Factories are imported and called here (under torch.device("meta"), so no weight memory): that runs the
    user's own code, which naming the factory asked for. Model files are checked by content; pickles are
    never executed unless trust_code (--trust-code).
    """
    spec = spec.strip()
    if not spec:
        raise _fail("no model given; pass zoo:NAME, a model file (.pt2, .ts, .pt) or a factory like models.py:build")
    shape = parse_input_shape(input_shape)
    dtype = parse_input_dtype(input_dtype)
    batch = _check_batch_size(batch_size)
    options = {"trust_code": trust_code, "input_shape": shape, "input_dtype": dtype, "batch_size": batch}

    if spec.startswith("zoo:"):
        source = ModelSource(spec="zoo:" + _zoo_source(spec), kind="zoo", **options)
    elif hf_folder.is_hf_spec(spec):
        if weights is not None:
            raise _fail(f"{spec} is a Hugging Face folder and holds its own weights; drop --weights")
        folder = hf_folder.resolve_folder(spec)
        hf_folder.check_folder(folder, spec, trust_code, weightless)
        source = ModelSource(spec=spec, kind="hf", path=str(folder), **options)
        source.build("meta")  # a config transformers cannot build fails now, before any work
    elif (factory := split_function_spec(spec)) is not None and not _is_file(spec):
        target, _ = factory
        source = ModelSource(spec=spec, kind="factory", path=_factory_path(target, spec), **options)
        # Import and call now, so a broken factory fails before any work starts.
        source._remember_inputs(source._call_factory(meta=True)[1])
    else:
        kind, path = _file_kind(spec)
        source = ModelSource(spec=spec, kind=kind, path=str(path), **options)
        _validate_file(source)

    if weights is not None:
        source.weights = str(_check_file(weights, "--weights").resolve())
        try:
            _validate_weights(source)
        except PlannerError as exc:
            # Name the file the way the user typed it, not the absolute path we store.
            raise _fail(str(exc).replace(source.weights, weights)) from None
    return source


def _validate_file(source: ModelSource) -> None:
    path = source._file()
    if source.kind == "export":
        source._remember_inputs(_export_example_inputs(_load_export(path, source.spec, source.trust_code)))
    elif source.kind == "torchscript":
        _load_torchscript(path, source.spec, source.trust_code)
    else:
        model = _load_pickle(path, source.spec, trust=source.trust_code)
        if not isinstance(model, nn.Module):
            raise _not_a_module(source.spec, model)


__all__ = ["KINDS", "ModelSource", "check_weights_match", "detect_format", "load_weights", "parse_input_dtype",
           "parse_input_shape", "resolve_source"]
