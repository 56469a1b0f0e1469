"""Look inside model files before any loader does: what a pickle would call and allocate, what a zip holds.

Loading is where files attack, so everything here reads bytes and never unpickles:

* `scan_pickle` walks a pickle's opcodes (pickletools.genops) with a small symbolic stack, so it knows which
  global each REDUCE/NEWOBJ would call and what each persistent storage id declares. torch's weights_only
  allowlist stops code, not allocation: `bytearray(3_000_000_000)` or `nn.Linear(30000, 30000)` built through
  REDUCE is a few hundred bytes of pickle and gigabytes of memory. So calls are allowed only for tensor/storage
  rebuild helpers and plain containers, and module classes only the way torch.save(model) creates them
  (NEWOBJ with no arguments, then BUILD with the state: __new__, no __init__).
* `check_zip_members` refuses member names that could escape or confuse (absolute, `..`, backslashes,
  symlinks, duplicates) and compressed members that expand far beyond the file (torch writes members stored).
* `check_storage_sizes` compares the bytes each storage declares with the member that holds it.
* `scan_pt2` inspects a torch.export archive: its JSON configs must not ask for pickled weights/constants or
  custom/opaque objects (those are unpickled with plain pickle), no AOTInductor member (native code), declared
  tensor sizes must fit their members, and the sample-inputs pickle must pass `scan_pickle`.

Each finding is a `ScanRefusal` (a PlannerError) whose text is one line; callers prefix the file's name.
"""

from __future__ import annotations

import io
import json
import pickletools
import stat
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from planner.core.errors import PlannerError

# A compressed member may expand this much beyond the whole file before we call it a bomb (torch writes its
# members stored, so a real model file has a ratio of 1).
MAX_EXPANSION = 4
EXPANSION_SLACK_BYTES = 16 * 2**20

# Functions torch.save emits REDUCE calls to when it pickles tensors, parameters and storages. Each one builds
# a tensor *view* over a storage whose bytes are already in the file (or a meta/wrapper tensor with no storage),
# so none can allocate more than the file holds.
REBUILD_CALLS = frozenset({
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_meta_tensor_no_storage", "torch._utils._rebuild_wrapper_subclass",
})
# Not _rebuild_qtensor: it allocates an empty quantized tensor of the declared size before attaching the storage.
# Plain containers and small values; their arguments are already in the pickle, so they are bounded by its size.
CONTAINER_CALLS = frozenset({
    "collections.OrderedDict", "builtins.set", "builtins.frozenset", "torch.device", "torch.Size",
    "_codecs.encode", "torch.serialization._get_layout",
})
# _rebuild_from_type_v2(func, type, args, state) calls func(*args): allowed only when func is a rebuild helper.
REBUILD_FROM_TYPE = "torch._tensor._rebuild_from_type_v2"
# Ops that mutate their target; a Global as target would rewrite a class or function in the running process.
_MUTATING_OPS = frozenset({"BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"})
# Ops that call or look up things the weights-only loader never needs (protocol 0/1 instance creation, the
# copyreg extension registry, text persistent ids).
_REFUSED_OPS = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


class ScanRefusal(PlannerError):
    """A model file that must not be loaded; the text says why, in one line, without the file name.

    `call` names the global a refused REDUCE/NEWOBJ would have called, so the caller can say whether that is
    code it would never run or an allowed class used to allocate."""

    def __init__(self, message: str, call: str | None = None) -> None:
        super().__init__(message)
        self.call = call


@dataclass(frozen=True)
class Global:
    """A pickle GLOBAL: a reference to module.name, which the unpickler would import."""

    name: str


class _Opaque:
    """A stack value the scan does not need to know (a list, a dict, the result of a call)."""


_OPAQUE = _Opaque()
_MARK = object()


@dataclass
class PickleScan:
    """What a pickle refers to and declares, learned without unpickling it."""

    globals: set[str] = field(default_factory=set)
    # (storage key, declared bytes) for each persistent storage id, in order.
    storages: list[tuple[str, int]] = field(default_factory=list)
    # bytes per element by storage class name, looked up once per class (a state dict names the same few).
    itemsizes: dict[str, int] = field(default_factory=dict)


def _global_name(module: str, name: str) -> str:
    # Protocol 2 pickles name builtins "__builtin__" (python 2 spelling); torch treats both the same.
    module = "builtins" if module == "__builtin__" else module
    return f"{module}.{name}"


def _storage_itemsize(storage_type: Any, resolve: Callable[[str], Any]) -> int:
    """Bytes per element of a storage class named in a persistent id (FloatStorage: 4, UntypedStorage: 1)."""
    if not isinstance(storage_type, Global):
        raise ScanRefusal("declares a storage of unknown type; re-save it with torch.save")
    cls = resolve(storage_type.name)
    if cls is None:
        raise ScanRefusal(f"declares a storage of type {storage_type.name}, which is not a torch storage")
    with warnings.catch_warnings():  # TypedStorage classes warn that they are deprecated on any use
        warnings.simplefilter("ignore")
        dtype = getattr(cls, "dtype", None)
    itemsize = getattr(dtype, "itemsize", None)
    if storage_type.name.endswith("UntypedStorage") or not isinstance(itemsize, int):
        return 1
    return itemsize


def _record_storage(pid: Any, scan: PickleScan, resolve: Callable[[str], Any]) -> None:
    """('storage', type, key, location, numel[, view]) → the key and the bytes torch would allocate for it."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        raise ScanRefusal("has a persistent id that is not a torch storage; re-save it with torch.save")
    _, storage_type, key, _, numel = pid[:5]
    if not isinstance(key, str) or isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ScanRefusal("declares a storage without a valid key and size; re-save it with torch.save")
    type_name = storage_type.name if isinstance(storage_type, Global) else ""
    if type_name not in scan.itemsizes:
        scan.itemsizes[type_name] = _storage_itemsize(storage_type, resolve)
    scan.storages.append((key, numel * scan.itemsizes[type_name]))


def _check_call(op: str, target: Any, args: Any, may_construct: Callable[[str], bool]) -> None:
    """Allow the calls a torch.save file makes; refuse any other before the unpickler could make it."""
    name = target.name if isinstance(target, Global) else None
    if op == "NEWOBJ" and name is not None and args == () and may_construct(name):
        return  # cls.__new__(cls): how torch.save(model) pickles modules; the state comes by BUILD
    if op == "REDUCE" and name in REBUILD_CALLS | CONTAINER_CALLS:
        return
    if op == "REDUCE" and name == REBUILD_FROM_TYPE and isinstance(args, tuple) and args \
            and isinstance(args[0], Global) and args[0].name in REBUILD_CALLS:
        return
    what = name or "a computed callable"
    raise ScanRefusal(f"asks the unpickler to call {what} ({op}), which torch.save never does for tensors or "
                      "modules and which could run code or allocate without bound", call=name)


def _pop_to_mark(stack: list[Any]) -> list[Any]:
    items: list[Any] = []
    while stack:
        item = stack.pop()
        if item is _MARK:
            items.reverse()
            return items
        items.append(item)
    raise ScanRefusal("is a malformed pickle (MARK missing); re-save or re-download it")


def _pop(stack: list[Any]) -> Any:
    if not stack:
        raise ScanRefusal("is a malformed pickle (stack underflow); re-save or re-download it")
    return stack.pop()


def _step(opcode: pickletools.OpcodeInfo, arg: Any, stack: list[Any], memo: dict[Any, Any], scan: PickleScan,
          may_construct: Callable[[str], bool], resolve: Callable[[str], Any]) -> None:
    """Apply one opcode to the symbolic stack (values the scan needs are kept, the rest become _OPAQUE)."""
    name = opcode.name
    if name in _REFUSED_OPS:
        raise ScanRefusal(f"uses the pickle opcode {name}, which torch.save never writes; re-save it with torch.save")
    if name == "GLOBAL":
        module, _, attr = str(arg).partition(" ")
        stack.append(Global(_global_name(module, attr)))
        scan.globals.add(stack[-1].name)
    elif name == "STACK_GLOBAL":
        attr, module = _pop(stack), _pop(stack)
        if not (isinstance(module, str) and isinstance(attr, str)):
            raise ScanRefusal("builds a global name at load time; re-save it with torch.save")
        stack.append(Global(_global_name(module, attr)))
        scan.globals.add(stack[-1].name)
    elif name in _PUT_OPS or name == "MEMOIZE":
        if not stack:
            raise ScanRefusal("is a malformed pickle (memo of an empty stack); re-save or re-download it")
        memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
    elif name in _GET_OPS:
        if arg not in memo:
            raise ScanRefusal("is a malformed pickle (unknown memo key); re-save or re-download it")
        stack.append(memo[arg])
    elif name == "REDUCE":
        args, target = _pop(stack), _pop(stack)
        _check_call(name, target, args, may_construct)
        stack.append(_OPAQUE)
    elif name == "NEWOBJ":
        args, target = _pop(stack), _pop(stack)
        _check_call(name, target, args, may_construct)
        stack.append(_OPAQUE)
    elif name == "NEWOBJ_EX":
        _pop(stack)
        args, target = _pop(stack), _pop(stack)
        _check_call(name, target, args, may_construct)  # refused: torch.save writes protocol 2 (no NEWOBJ_EX)
        stack.append(_OPAQUE)
    elif name == "BINPERSID":
        pid = _pop(stack)
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "module" and isinstance(pid[1], Global):
            # Legacy files refer to each module class as ('module', cls, source file, source); the class is what
            # the loader hands back, so keep it on the stack for the NEWOBJ check that follows.
            stack.append(pid[1])
        else:
            _record_storage(pid, scan, resolve)
            stack.append(_OPAQUE)
    elif name == "TUPLE":
        stack.append(tuple(_pop_to_mark(stack)))
    elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
        count = int(name[-1])
        items = [_pop(stack) for _ in range(count)]
        stack.append(tuple(reversed(items)))
    elif name == "EMPTY_TUPLE":
        stack.append(())
    elif name == "DUP":
        stack.append(stack[-1] if stack else _OPAQUE)
    elif name == "MARK":
        stack.append(_MARK)
    else:
        _generic_step(opcode, arg, stack)


def _generic_step(opcode: pickletools.OpcodeInfo, arg: Any, stack: list[Any]) -> None:
    """Opcodes that only shuffle data: pop what they consume, push what they make (the value, for literals)."""
    before = opcode.stack_before
    if pickletools.markobject in before:
        _pop_to_mark(stack)
        popped = [_pop(stack) for _ in range(before.index(pickletools.markobject))]
    else:
        popped = [_pop(stack) for _ in before]
    if opcode.name in _MUTATING_OPS and any(isinstance(item, Global) for item in popped[-1:]):
        # BUILD/SETITEM on a class or function would rewrite it (say, replace a module's forward) in this process.
        raise ScanRefusal(f"modifies {popped[-1].name} while loading ({opcode.name}); re-save it with torch.save")
    if opcode.name in _MUTATING_OPS:
        stack.append(popped[-1])  # the mutated object stays on the stack
        return
    literal = arg if isinstance(arg, (str, int, float, bool)) and opcode.arg is not None else _OPAQUE
    if opcode.name in ("NONE", "NEWTRUE", "NEWFALSE"):
        literal = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[opcode.name]
    for _ in opcode.stack_after:
        stack.append(literal)


def scan_pickle(stream: IO[bytes], *, may_construct: Callable[[str], bool],
                resolve: Callable[[str], Any]) -> PickleScan:
    """Walk one pickle (up to its STOP) and refuse it if it would call or allocate beyond what torch.save writes.

    may_construct(name): whether the class `name` may be created by NEWOBJ with no arguments (module classes).
    resolve(name): the object a global names, without importing anything new, or None.
    """
    scan = PickleScan()
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            _step(opcode, arg, stack, memo, scan, may_construct, resolve)
    except ScanRefusal:
        raise
    except Exception as exc:  # noqa: BLE001 - ValueError from genops on truncated or garbage bytes
        raise ScanRefusal(f"is not a readable pickle ({type(exc).__name__}: {str(exc)[:80]}); "
                          "re-save or re-download it") from None
    return scan


# ---------------------------------------------------------------------------------------------------------------
# Zip archives


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def check_member_name(name: str) -> None:
    """Refuse names an extractor (or a loader that joins paths) could be tricked by."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or "\x00" in name or ".." in parts \
            or (len(name) > 1 and name[1] == ":"):
        raise ScanRefusal(f"contains the member {name[:80]!r}, a name that could point outside the archive")


def check_zip_members(infos: list[zipfile.ZipInfo], file_bytes: int) -> None:
    """Names, symlinks, duplicates, and compressed members that expand far beyond the file (zip bombs)."""
    seen: set[str] = set()
    declared = 0
    for info in infos:
        check_member_name(info.filename)
        if _is_symlink(info):
            raise ScanRefusal(f"contains the symbolic link {info.filename[:80]!r}; torch never writes links")
        if info.filename in seen:
            raise ScanRefusal(f"contains {info.filename[:80]!r} twice; which copy a loader reads is ambiguous")
        seen.add(info.filename)
        declared += info.file_size
    if declared > file_bytes * MAX_EXPANSION + EXPANSION_SLACK_BYTES:
        raise ScanRefusal(f"declares {declared:,} bytes of content in a {file_bytes:,}-byte file (compressed "
                          "members torch does not write); refusing a possible zip bomb, re-save it with torch.save")


def check_stored(infos: list[zipfile.ZipInfo]) -> None:
    """torch.save and torch.export.save write every member stored; torch's mmap'd and record readers take a
    compressed member's bytes as they are (garbage tensors, or errors deep inside the load). (TorchScript does
    compress its code members, so this is not checked for it.)"""
    compressed = next((info.filename for info in infos if info.compress_type != zipfile.ZIP_STORED), None)
    if compressed is not None:
        raise ScanRefusal(f"has a compressed member ({compressed[:80]}), which torch does not write and reads "
                          "wrongly; re-save it with torch.save (not a zip tool)")


def check_storage_sizes(storages: Iterable[tuple[str, int]], member_bytes: Callable[[str], int | None]) -> None:
    """Each declared storage must be backed by a member at least that large (torch reads/allocates the declared
    size)."""
    for key, declared in storages:
        actual = member_bytes(key)
        if actual is None:
            raise ScanRefusal(f"declares storage {key[:40]!r} but has no member holding it; re-save or re-download it")
        if declared > actual:
            raise ScanRefusal(f"declares {declared:,} bytes for storage {key[:40]!r} but holds {actual:,}; "
                              "refusing a possible memory bomb, re-save or re-download it")


def _strip_prefix(names: list[str]) -> tuple[str, dict[str, str]]:
    """torch archives keep every member under one top-level folder; map inner names to full names."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1 or any("/" not in n for n in names):
        raise ScanRefusal("does not keep its members under one top-level folder as torch does; re-save it")
    top = tops.pop()
    return top, {n.split("/", 1)[1]: n for n in names}


def scan_torch_zip(archive: zipfile.ZipFile, file_bytes: int, *, may_construct: Callable[[str], bool],
                   resolve: Callable[[str], Any]) -> PickleScan:
    """A torch.save zip (a .pt file, or a member of a .pt2): members, then data.pkl's calls and storage sizes."""
    infos = archive.infolist()
    check_zip_members(infos, file_bytes)
    check_stored(infos)
    _, inner = _strip_prefix([i.filename for i in infos])
    if "data.pkl" not in inner:
        raise ScanRefusal("has no data.pkl; it is not a torch.save archive")
    # Read whole (it is stored, so no larger than the file): genops on a zip stream is several times slower.
    scan = scan_pickle(io.BytesIO(archive.read(inner["data.pkl"])), may_construct=may_construct, resolve=resolve)
    sizes = {name: archive.getinfo(full).file_size for name, full in inner.items()}
    check_storage_sizes(scan.storages, lambda key: sizes.get(f"data/{key}"))
    return scan


def scan_legacy_pickle(stream: IO[bytes], file_bytes: int, *, may_construct: Callable[[str], bool],
                       resolve: Callable[[str], Any]) -> PickleScan:
    """torch.save(..., _use_new_zipfile_serialization=False): magic, protocol, sys info and the object, each a
    pickle, then the storage keys and raw bytes. Legacy loading allocates each declared storage before reading
    it, so the declared total must fit in the file."""
    combined = PickleScan()
    for _ in range(4):
        part = scan_pickle(stream, may_construct=may_construct, resolve=resolve)
        combined.globals |= part.globals
        combined.storages += part.storages
    declared = sum(size for _, size in combined.storages)
    if declared > file_bytes:
        raise ScanRefusal(f"declares {declared:,} bytes of tensors in a {file_bytes:,}-byte file; "
                          "refusing a possible memory bomb, re-save or re-download it")
    return combined


# ---------------------------------------------------------------------------------------------------------------
# torch.export archives (.pt2)


def _span_elements(sizes: list[int], strides: list[int], offset: int) -> int:
    """Elements a strided view reaches into its storage (0 for an empty tensor)."""
    if any(s == 0 for s in sizes):
        return 0
    return offset + 1 + sum((size - 1) * stride for size, stride in zip(sizes, strides, strict=False))


def _ints(values: Any, what: str) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, dict) and isinstance(v.get("as_int"), int)
                                               and not isinstance(v.get("as_int"), bool) for v in values):
        raise ScanRefusal(f"has a tensor with non-integer {what} in its config; re-export it")
    ints = [v["as_int"] for v in values]
    if any(i < 0 for i in ints):
        raise ScanRefusal(f"has a tensor with negative {what} in its config; re-export it")
    return ints


def _tensor_bytes(meta: Any, itemsize_of: Callable[[int], int | None]) -> int:
    """Bytes a non-pickled payload's tensor_meta needs from its member."""
    if not isinstance(meta, dict):
        raise ScanRefusal("has a tensor without metadata in its config; re-export it")
    itemsize = itemsize_of(meta.get("dtype"))
    if itemsize is None:
        raise ScanRefusal(f"has a tensor of unknown dtype code {meta.get('dtype')!r}; re-export it")
    sizes, strides = _ints(meta.get("sizes"), "sizes"), _ints(meta.get("strides"), "strides")
    offset = _ints([meta.get("storage_offset")], "storage offset")[0]
    if len(sizes) != len(strides) or len(sizes) > 64:
        raise ScanRefusal("has a tensor whose sizes and strides disagree in its config; re-export it")
    return _span_elements(sizes, strides, offset) * itemsize


def _check_payload_config(kind: str, config: Any, folder: str, archive: zipfile.ZipFile,
                          inner: dict[str, zipfile.ZipInfo], itemsize_of: Callable[[int], int | None],
                          resolve: Callable[[str], Any]) -> None:
    """A weights/constants config: no custom or opaque objects, pickled tensors that pass the pickle scan (the
    loader is made to read them weights_only), plain tensors whose declared sizes fit their members."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise ScanRefusal(f"has a {kind} config that is not what torch.export.save writes; re-export it")
    for fqn, payload in entries.items():
        shown = str(fqn)[:60]
        path_name = payload.get("path_name") if isinstance(payload, dict) else None
        if not isinstance(path_name, str):
            raise ScanRefusal(f"has {kind} {shown!r} without a member name; re-export it")
        check_member_name(path_name)
        if path_name.startswith(("custom_obj_", "opaque_obj_")):
            raise ScanRefusal(f"holds {kind} {shown!r} as a custom or opaque object, which torch.export.load "
                              "unpickles without restriction; export a model without script/opaque objects")
        member = inner.get(folder + path_name)
        if member is None:
            raise ScanRefusal(f"has {kind} {shown!r} but no member {path_name!r}; re-export it")
        if payload.get("use_pickle"):
            # Tensor subclasses (torchao's quantized weights) are stored as torch.save pickles; torch loads them
            # with weights_only=False, which the caller overrides. Scan them like any pickle first.
            _scan_nested_torch_save(archive.read(member), f"{kind} {shown!r}", resolve=resolve, plain=False)
            continue
        needed = _tensor_bytes(payload.get("tensor_meta"), itemsize_of)
        # A 0-byte member makes torch allocate zeros of the declared size; any other member must cover the view.
        if (member.file_size == 0 and needed > 0) or needed > member.file_size:
            raise ScanRefusal(f"declares {needed:,} bytes for {kind} {shown!r} but its member holds "
                              f"{member.file_size:,}; refusing a possible memory bomb, re-export it")


def _json_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> Any:
    try:
        return json.loads(archive.read(info).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError, zipfile.BadZipFile, OSError):
        raise ScanRefusal(f"has an unreadable {what} ({info.filename[:80]}); re-export it") from None


def scan_pt2(archive: zipfile.ZipFile, file_bytes: int, *, itemsize_of: Callable[[int], int | None],
             resolve: Callable[[str], Any]) -> None:
    """Everything torch.export.load would read, checked before it reads it."""
    infos = archive.infolist()
    check_zip_members(infos, file_bytes)
    check_stored(infos)
    _, names = _strip_prefix([i.filename for i in infos])
    inner = {name: archive.getinfo(full) for name, full in names.items()}
    native = [n for n in inner if n.startswith(("data/aotinductor/", "data/executorch/", "data/mtia/"))
              or n.endswith((".so", ".dll", ".dylib", ".pyd"))]
    if native:
        raise ScanRefusal(f"contains compiled native code ({native[0][:80]}), which loading would run; "
                          "pass a plain torch.export.save archive")
    if "archive_format" not in inner or not any(n.startswith("models/") and n.endswith(".json") for n in inner):
        raise ScanRefusal("is not in the torch.export archive format this torch reads (an older torch.export "
                          "file, whose loader unpickles its contents); re-export it with this torch")
    for name in inner:
        if name.startswith("models/") and name.endswith(".json"):
            model = name[len("models/"):-len(".json")]
            check_member_name(model)
            for kind, folder in (("weight", "data/weights/"), ("constant", "data/constants/")):
                config_name = f"{folder}{model}_{kind}s_config.json"
                if config_name not in inner:
                    raise ScanRefusal(f"has no {kind}s config for model {model!r}; re-export it")
                _check_payload_config(kind, _json_member(archive, inner[config_name], f"{kind}s config"),
                                      folder, archive, inner, itemsize_of, resolve)
            sample = inner.get(f"data/sample_inputs/{model}.pt")
            if sample is not None and sample.file_size > 0:
                _scan_nested_torch_save(archive.read(sample), "sample inputs", resolve=resolve, plain=True)
        elif name.startswith("data/weights/") and name.endswith(".pt"):
            # torch's legacy weights file inside a new archive: loaded with weights_only=False. Refuse it.
            raise ScanRefusal(f"stores its weights as a pickle ({name[:80]}), which torch.export.load unpickles "
                              "without restriction; re-export it with this torch")
        elif name.startswith("data/constants/") and name.endswith(".pt"):
            raise ScanRefusal(f"stores its constants as a pickle ({name[:80]}), which torch.export.load unpickles "
                              "without restriction; re-export it with this torch")


def _scan_nested_torch_save(blob: bytes, what: str, *, resolve: Callable[[str], Any], plain: bool) -> None:
    """A torch.save zip stored inside the .pt2 (sample inputs, a pickled weight or constant). torch loads these
    with weights_only=True and, for sample inputs, falls back to weights_only=False. No module may be constructed
    in them; with `plain` (sample inputs: tensors and containers) every global must also be one the restricted
    resolver knows, where pickled weights may name tensor subclasses (weights_only checks those)."""
    try:
        nested = zipfile.ZipFile(io.BytesIO(blob))
    except (zipfile.BadZipFile, ValueError):
        raise ScanRefusal(f"has {what} that are not a torch.save archive; re-export it") from None
    with nested:
        try:
            scan = scan_torch_zip(nested, len(blob), may_construct=lambda name: False, resolve=resolve)
        except ScanRefusal as exc:
            raise ScanRefusal(f"has {what} whose pickle {exc}", call=exc.call) from None
    known_calls = REBUILD_CALLS | CONTAINER_CALLS | {REBUILD_FROM_TYPE}
    unknown = sorted(name for name in scan.globals if name not in known_calls and resolve(name) is None)
    if plain and unknown:
        raise ScanRefusal(f"has {what} that refer to {unknown[0]}, which is not a tensor type or container; "
                          "re-export it")


__all__ = ["MAX_EXPANSION", "Global", "PickleScan", "ScanRefusal", "check_member_name", "check_storage_sizes",
           "check_stored",
           "check_zip_members", "scan_legacy_pickle", "scan_pickle", "scan_pt2", "scan_torch_zip"]
