"""Recipes as data: TOML files in recipes/, each naming at most one quantization scheme (planner.schemes).

A recipe is a dtype for the floating tensors, optionally magnitude pruning, optionally a torchao
weight quantization scheme applied to the layer types it names. Each scheme (one file in
planner/schemes/) knows its exact stored layout (so the analytic footprint needs no weights), which
layers it can take, and whether it needs CUDA. Applying a recipe uses torchao's `quantize_` with the same layer filter
the footprint uses, so the analytic and the verified figures describe the same model.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from planner.core.errors import PlannerError
from planner.core.safe_io import check_name, read_text_capped
from planner.core.text import first_names
from planner.schemes import SCHEMES, Scheme, TensorLayout
from planner.schemes import import_tensor_types as import_tensor_types

__all__ = ["SCHEMES", "Scheme", "TensorLayout"]  # re-exported: the scheme objects live in planner.schemes

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# The default set lives in the repository's recipes/ folder (the package is installed editable).
DEFAULT_RECIPES_FILE = Path(__file__).resolve().parents[2] / "recipes" / "default.toml"


# Conv1D is transformers' transposed linear (GPT-2): pruning is layout-agnostic, so it is included.
PRUNABLE_DEFAULT = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D")
# Quantized by default: torchao's Linear, and transformers' Conv1D (GPT-2's every projection), which the
# recipe turns into the equivalent Linear first (see linearize_conv1d).
QUANTIZABLE_DEFAULT = ("Linear", "Conv1D")
# A recipe file is a few kB; a mixed recipe for a large model a few MB. The caps keep a hostile or mistaken file
# (a device, 300k layer tables) from exhausting memory or time before a one-line error.
MAX_RECIPE_FILE_BYTES = 4 * 1024 * 1024  # tomllib parses about 1 MB a second here
MAX_RECIPES = 1000
MAX_LAYER_ENTRIES = 20_000  # a 405B-parameter LLM has under 1,000 linear layers
# Names the work directory uses for its own files (inputs.pt, reference.pt), and the suffixes it appends to a
# recipe name (NAME.onnx, NAME.fp32.onnx, NAME.job.json...): a recipe named like them would overwrite them.
RESERVED_NAMES = {"inputs", "reference", "manifest", "plan", "layers"}
RESERVED_SUFFIXES = {"onnx", "fp32", "pt", "ts", "json", "data", "tmp", "toml", "onnx-build", "job", "result", "lock"}
MAX_FQN_CHARS = 1000
MIXED_PREFIX = "mixed:"  # the planner's own mixed-precision rows: mixed:<budget>
RECIPE_KEYS = {"name", "description", "dtype", "quantize", "bits", "group_size", "mapping", "layers", "prune",
               "prune_layers", "layer", "channels", "params"}
LAYER_KEYS = {"fqn", "quantize", "bits", "group_size", "mapping"}


@dataclass(frozen=True)
class LayerOverride:
    """One [[recipe.layer]] table: this module (by fully qualified name) gets this scheme, or none."""

    fqn: str
    quantize: str | None  # a key of SCHEMES; None keeps the layer in the recipe's dtype
    bits: int = 8
    group_size: int = 128
    mapping: str = "asymmetric"
    # Kept float by keep_ties, not by the user's table: a runtime that cannot keep the tie drops it (untied).
    tied: bool = False

    @property
    def label(self) -> str:
        return "float" if self.quantize is None else SCHEMES[self.quantize].label(self)

    def to_json(self) -> dict[str, Any]:
        return {"fqn": self.fqn, "quantize": self.quantize or "none", "bits": self.bits,
                "group_size": self.group_size, "mapping": self.mapping, **({"tied": True} if self.tied else {})}
MAPPINGS = ("asymmetric", "symmetric")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    dtype: str = "float32"  # floating parameters, buffers and inputs are cast to this
    quantize: str | None = None  # a key of SCHEMES
    bits: int = 8
    group_size: int = 128
    # intx only. Asymmetric by default: symmetric int4 clips a bias that adds up over long dot products
    # (ComplexNet fc1: about 1 dB output SQNR symmetric against 25 dB asymmetric).
    mapping: str = "asymmetric"
    layers: tuple[str, ...] = QUANTIZABLE_DEFAULT  # layer types the quantization touches
    prune: float = 0.0  # fraction of each weight zeroed by L1 magnitude
    prune_layers: tuple[str, ...] = PRUNABLE_DEFAULT
    # Structured pruning (planner.analysis.pruning, torch-pruning): share of channels/neurons removed per dependency
    # group; or `params`, a share of parameters to remove, for which the planner solves the channel share.
    channels: float = 0.0
    params: float = 0.0
    source: str = field(default="", compare=False)  # file it came from
    # Per-layer precision (a mixed recipe): these modules take their own scheme whatever `layers` says.
    layer_overrides: tuple[LayerOverride, ...] = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def dtype_bytes(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def scheme(self) -> Scheme | None:
        return SCHEMES[self.quantize] if self.quantize else None

    @property
    def quantizes(self) -> bool:
        """Whether any layer gets a torchao tensor (loading the artifact then needs torchao)."""
        return self.scheme is not None or any(o.quantize for o in self.layer_overrides)

    @cached_property
    def _overrides_by_fqn(self) -> dict[str, LayerOverride]:
        # Looked up once per module of the model: a dict keeps a 100k-layer mixed recipe linear.
        return {o.fqn: o for o in self.layer_overrides}

    def override_for(self, fqn: str) -> LayerOverride | None:
        return self._overrides_by_fqn.get(fqn)

    def for_layer(self, fqn: str, module: nn.Module) -> Recipe:
        """The uniform recipe that describes this one module: the recipe itself, or its override."""
        override = self.override_for(fqn)
        if override is None:
            return self
        return replace(self, quantize=override.quantize, bits=override.bits, group_size=override.group_size,
                       mapping=override.mapping, layer_overrides=())

    def touches(self) -> str:
        """Which tensors the recipe changes, in words, for the table and `planner recipes`."""
        parts = []
        if self.layer_overrides:
            chosen = Counter(o.label for o in self.layer_overrides if o.quantize)
            parts.append("per layer: " + (", ".join(f"{label} on {count} layer(s)" for label, count in chosen.items())
                                          or "no layer quantized"))
        if self.params or self.channels:
            target = f" to remove {self.params:.0%} of parameters" if self.params else ""
            share = f"{self.channels:.0%} of" if self.channels else "a share of"
            parts.append(f"removes {share} channels/neurons{target} (structured, L1; torch-pruning)")
        if self.prune:
            storage = "stored sparse where smaller" if self.scheme is None else "stored dense"
            parts.append(f"prunes {self.prune:.0%} of {'/'.join(self.prune_layers)} weights ({storage})")
        if self.scheme:
            parts.append(f"{self.quantize} on {'/'.join(self.layers)}")
        parts.append(f"everything else {self.dtype}" if self.scheme else f"all floating tensors {self.dtype}")
        return "; ".join(parts)

    @property
    def tensor_modules(self) -> tuple[str, ...]:
        """What `import` a fresh process needs before torch.load(weights_only=True) accepts this recipe's tensors
        (the scheme's and every layer override's), in a stable order."""
        schemes = [self.scheme, *(SCHEMES[o.quantize] for o in self.layer_overrides if o.quantize)]
        return tuple(dict.fromkeys(module for scheme in schemes if scheme for module in scheme.tensor_modules))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipe:
        """The inverse of to_json (a job or a manifest carries the recipe this way)."""
        fields = {key: value for key, value in data.items() if value is not None}
        # keep_ties' mark travels in JSON only: a [[recipe.layer]] table a user writes has no "tied" key
        layers = fields.get("layer")
        tied = {table.get("fqn") for table in layers if isinstance(table, dict) and table.get("tied")} \
            if isinstance(layers, list) else set()
        if tied:
            fields["layer"] = [{key: value for key, value in table.items() if key != "tied"} for table in layers]
        recipe = recipe_from_table(fields, "recipe JSON")
        if not tied:
            return recipe
        return replace(recipe, layer_overrides=tuple(replace(o, tied=o.fqn in tied) for o in recipe.layer_overrides))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "dtype": self.dtype,
                "quantize": self.quantize, "bits": self.bits, "group_size": self.group_size,
                "mapping": self.mapping, "layers": list(self.layers), "prune": self.prune,
                "prune_layers": list(self.prune_layers), "layer": [o.to_json() for o in self.layer_overrides],
                "channels": self.channels, "params": self.params}

    @property
    def structured(self) -> bool:
        return bool(self.channels or self.params)

    @property
    def changes_weights(self) -> bool:
        """Pruned (either kind): the weights differ from the float32 reference's."""
        return bool(self.prune) or self.structured


def check_recipe_name(name: str, where: str = "recipe name") -> str:
    """`name` if it is safe as a file name in the work directory and the export folder, else a PlannerError.

    Every recipe name becomes part of a path (NAME.pt, NAME.job.json, an export folder NAME/), so it is one
    plain path component (safe_io.check_name), not a name the planner's own files use. The planner's mixed rows
    are named mixed:<budget>; there the budget part is checked the same way."""
    plain = name[len(MIXED_PREFIX):] if isinstance(name, str) and name.startswith(MIXED_PREFIX) else name
    check_name(plain, where)
    suffix = plain.rsplit(".", 1)[1].lower() if "." in plain else ""
    if plain.lower() in RESERVED_NAMES or suffix in RESERVED_SUFFIXES:
        raise PlannerError(f"{where} {name!r} is not allowed: the planner names its own files that way "
                           f"({', '.join(sorted(RESERVED_NAMES))}, or ending in .{suffix or 'onnx'}); rename it")
    return name


def recipe_from_table(table: dict[str, Any], where: str, *, is_layer: bool = False) -> Recipe:
    """Validate one [[recipe]] table; every problem is a PlannerError naming the recipe and key.

    is_layer: the table is a [[recipe.layer]] checked with the recipe rules; its "name" is a module fqn, which
    never becomes a path, so the file-name rules do not apply."""
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise PlannerError(f"{where}: every [[recipe]] needs a name = \"...\"")
    if not is_layer:
        check_recipe_name(name, f"{where}: recipe name")
    label = f"{where}: recipe {name!r}"
    _reject_unknown_keys(table, RECIPE_KEYS, label)
    dtype = table.get("dtype", "float32")
    if dtype not in DTYPES:
        raise PlannerError(f"{label}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    quantize = table.get("quantize")
    if quantize is not None and quantize not in SCHEMES:
        raise PlannerError(f"{label}: quantize {quantize!r} is not one of {', '.join(SCHEMES)}")
    bits = table.get("bits", SCHEMES[quantize].default_bits if quantize else 8)
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise PlannerError(f"{label}: bits must be an integer from 1 to 8")
    group_size = table.get("group_size", 128)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise PlannerError(f"{label}: group_size must be a positive integer")
    mapping = table.get("mapping", "asymmetric")
    if mapping not in MAPPINGS:
        raise PlannerError(f"{label}: mapping must be one of {', '.join(MAPPINGS)}")
    prune = _fraction(table, "prune", label)
    channels, params = (_fraction(table, key, label) for key in ("channels", "params"))
    layers = _layer_list(table.get("layers", list(QUANTIZABLE_DEFAULT)), label, "layers")
    prune_layers = _layer_list(table.get("prune_layers", list(PRUNABLE_DEFAULT)), label, "prune_layers")
    description = table.get("description", "")
    if not isinstance(description, str):
        raise PlannerError(f"{label}: description must be a string")
    overrides = _layer_overrides(table.get("layer", []), label)
    return Recipe(name=name, description=description, dtype=dtype, quantize=quantize, bits=bits,
                  group_size=group_size, mapping=mapping, layers=layers, prune=prune, prune_layers=prune_layers,
                  channels=channels, params=params, source=where, layer_overrides=overrides)


def _layer_overrides(tables: Any, label: str) -> tuple[LayerOverride, ...]:
    """Validate the [[recipe.layer]] tables of a mixed recipe: fqn and a scheme (or "none") each."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise PlannerError(f"{label}: layer must be [[recipe.layer]] tables with fqn = \"...\" and quantize = \"...\"")
    if len(tables) > MAX_LAYER_ENTRIES:
        raise PlannerError(f"{label}: {len(tables):,} [[recipe.layer]] tables, more than the {MAX_LAYER_ENTRIES:,} "
                           "allowed; list only the layers the model has")
    overrides: list[LayerOverride] = []
    seen: set[str] = set()  # a set, not a scan of the list: 300k layers must stay linear
    for table in tables:
        fqn = table.get("fqn")
        if not isinstance(fqn, str) or not fqn:
            raise PlannerError(f"{label}: every [[recipe.layer]] needs fqn = \"module.name\"")
        if len(fqn) > MAX_FQN_CHARS:
            raise PlannerError(f"{label}: a layer fqn of {len(fqn):,} characters is not a module name; "
                               "use the names `planner inspect MODEL` shows")
        where = f"{label}, layer {fqn!r}"
        _reject_unknown_keys(table, LAYER_KEYS, where)
        quantize = table.get("quantize", "none")
        if quantize != "none" and quantize not in SCHEMES:
            raise PlannerError(f"{where}: quantize {quantize!r} is not none or one of {', '.join(SCHEMES)}")
        checked = recipe_from_table({"name": fqn, **{k: v for k, v in table.items() if k != "fqn"},
                                     "quantize": None if quantize == "none" else quantize}, where, is_layer=True)
        if fqn in seen:
            raise PlannerError(f"{where}: the layer is listed twice")
        seen.add(fqn)
        overrides.append(LayerOverride(fqn, checked.quantize, checked.bits, checked.group_size, checked.mapping))
    return tuple(overrides)


def _reject_unknown_keys(table: dict[str, Any], known: set[str], label: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise PlannerError(f"{label}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")


def _fraction(table: dict[str, Any], key: str, label: str) -> float:
    value = table.get(key, 0.0)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1:
        raise PlannerError(f"{label}: {key} must be a fraction from 0 to below 1, e.g. 0.5")
    return float(value)


def _layer_list(value: Any, label: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
        raise PlannerError(f"{label}: {key} must be a non-empty list of layer type names, e.g. [\"Linear\"]")
    return tuple(value)


def load_recipe_file(path: str | Path) -> list[Recipe]:
    """Read a TOML file of [[recipe]] tables. Syntax errors name the line (tomllib's message does).

    Only a regular file of at most MAX_RECIPE_FILE_BYTES is read (a FIFO or /dev/zero never ends), and every
    check below is linear in the file, so the worst file costs a second or two before its one-line error."""
    path = Path(path)
    text = read_text_capped(path, "recipe file", MAX_RECIPE_FILE_BYTES)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PlannerError(f"recipe file {path} is not valid TOML: {error}") from error
    except RecursionError:  # tomllib recurses per nesting level: [[[[... thousands deep
        raise PlannerError(f"recipe file {path} nests arrays or tables too deeply to be a recipe file; "
                           "see recipes/default.toml for the format") from None
    tables = data.get("recipe")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise PlannerError(f"recipe file {path} has no [[recipe]] tables: see recipes/default.toml for the format")
    if len(tables) > MAX_RECIPES:
        raise PlannerError(f"recipe file {path} has {len(tables):,} recipes, more than the {MAX_RECIPES:,} allowed "
                           "(each is verified for real); split it")
    layer_entries = sum(len(t["layer"]) for t in tables if isinstance(t.get("layer"), list))
    if layer_entries > MAX_LAYER_ENTRIES:
        raise PlannerError(f"recipe file {path} has {layer_entries:,} [[recipe.layer]] tables, more than the "
                           f"{MAX_LAYER_ENTRIES:,} allowed; list only the layers the model has")
    recipes = [recipe_from_table(table, str(path)) for table in tables]
    seen: set[str] = set()
    for recipe in recipes:
        if recipe.name in seen:
            raise PlannerError(f"recipe file {path}: the name {recipe.name!r} is used twice")
        seen.add(recipe.name)
    return recipes


def default_recipes() -> list[Recipe]:
    return load_recipe_file(DEFAULT_RECIPES_FILE)


def select_recipes(available: list[Recipe], names: str | None) -> list[Recipe]:
    """Pick recipes by a comma-separated list of names, in the order given; unknown names get suggestions."""
    if not names:
        return available
    by_name = {recipe.name: recipe for recipe in available}
    chosen: list[Recipe] = []
    taken: set[str] = set()  # by name: comparing whole recipes (their layer tables) would be quadratic
    for name in (part.strip() for part in names.split(",")):
        if not name:
            continue
        if name not in by_name:
            check_recipe_name(name, "--recipes name")  # a hostile name is refused, not echoed into a hint
            close = difflib.get_close_matches(name, by_name, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "run `planner recipes` for the list"
            raise PlannerError(f"unknown recipe {name!r}: {hint}")
        if name not in taken:
            taken.add(name)
            chosen.append(by_name[name])
    if not chosen:
        raise PlannerError("--recipes selected nothing: give comma-separated names from `planner recipes`")
    return chosen


# ---- which layers a recipe touches: one filter for the footprint and for quantize_ ----

def _type_names(module: nn.Module) -> set[str]:
    names = {cls.__name__ for cls in type(module).__mro__}
    original = getattr(module, "original_name", None)  # TorchScript keeps the Python class name here
    if isinstance(original, str):
        names.add(original)
    return names


def quantization_decision(module: nn.Module, recipe: Recipe) -> tuple[bool, str]:
    """(quantized?, reason) for one module under the recipe's scheme."""
    scheme = recipe.scheme
    if scheme is None:
        return False, ""
    names = _type_names(module)
    if not names & set(recipe.layers):
        return False, ""
    if "NonDynamicallyQuantizableLinear" in names:
        # MultiheadAttention reads out_proj.weight directly; torchao skips it too.
        return False, "attention out_proj (MultiheadAttention uses the raw weight)"
    shape = linear_shape(module)
    if shape is None:
        return False, f"{type(module).__name__} has no 2-D weight"
    reason = scheme.why_not(*shape, recipe)
    return reason is None, reason or ""


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out_features, in_features) of a layer's 2-D weight; transformers' Conv1D stores it as (in, out)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    rows, columns = weight.shape
    return (columns, rows) if _is_conv1d(module) else (rows, columns)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers.pytorch_utils.Conv1D


# The build note that says a quantized artifact's Conv1D layers are nn.Linear now (the export's load line reads it).
CONV1D_LINEARIZED_NOTE = "transformers Conv1D layers became nn.Linear (weight transposed) so torchao quantizes them"


def linearize_conv1d(model: nn.Module, recipe: Recipe) -> list[str]:
    """Replace each transformers Conv1D the recipe quantizes with the equivalent nn.Linear (weight transposed),
    since torchao quantizes Linear only. Deterministic from the structure and the recipe, so the verification
    worker and `load_artifact` rebuild the same structure before loading. Returns the replaced layer names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if not _is_conv1d(module) or not layer_decision(module, name, recipe)[1]:
            continue
        out_f, in_f = linear_shape(module) or (0, 0)
        weight, bias = module.weight, module.bias
        linear = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        # A transposed view, not a copy: quantizing reads it once, and a copy of every projection at once
        # would hold a second float model (GPT-2: +340 MB at the planner's peak).
        linear.weight = nn.Parameter(weight.detach().t(), requires_grad=weight.requires_grad)
        if bias is not None:
            linear.bias = bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
        replaced.append(name)
    return replaced


def layer_decision(module: nn.Module, fqn: str, recipe: Recipe) -> tuple[Recipe, bool, str]:
    """(the recipe for this layer, quantized?, reason): one decision for the footprint, the trace and apply."""
    layer_recipe = recipe.for_layer(fqn, module)
    return (layer_recipe, *quantization_decision(module, layer_recipe))


def layer_filter(recipe: Recipe) -> Callable[[nn.Module, str], bool]:
    return lambda module, fqn: layer_decision(module, fqn, recipe)[1]


def check_layer_overrides(model: nn.Module, recipe: Recipe) -> None:
    """Every [[recipe.layer]] must name a module of this model that its scheme can take."""
    modules = dict(model.named_modules())
    for override in recipe.layer_overrides:
        module = modules.get(override.fqn)
        if module is None:
            close = difflib.get_close_matches(override.fqn, modules, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "run `planner inspect MODEL` for the layer names"
            raise PlannerError(f"recipe {recipe.name!r}: the model has no layer {override.fqn!r}: {hint}")
        _, quantized, reason = layer_decision(module, override.fqn, recipe)
        if override.quantize and not quantized:
            why = reason or f"{type(module).__name__} is not one of {'/'.join(recipe.layers)}"
            raise PlannerError(f"recipe {recipe.name!r}: layer {override.fqn!r} cannot take {override.quantize}: {why}")


def tied_parameters(model: nn.Module) -> list[list[tuple[str, nn.Module, str]]]:
    """Each parameter held by more than one module (a language model's head tied to its embedding), as its
    (module name, module, attribute) holders."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for fqn, module in model.named_modules():
        for attribute, tensor in module._parameters.items():
            if tensor is not None:
                holders.setdefault(id(tensor), []).append((fqn, module, attribute))
    return [group for group in holders.values() if len(group) > 1]


def keep_ties(model: nn.Module, recipe: Recipe) -> tuple[Recipe, str | None]:
    """The recipe with every layer kept float whose weight is tied to a layer the recipe leaves float (a language
    model's head tied to its embedding), and a note naming them; the recipe unchanged when there is none.

    torchao replaces each holder's weight on its own, so quantizing one side of a tie stores a second copy: on tied
    small LMs every int8/int4 recipe came out larger on disk than bf16 (int4 360 MB against bf16 332 MB; 288 MB
    with the head kept). A layer named in a [[recipe.layer]] table is the user's choice and is left as written."""
    if recipe.scheme is None and not any(override.quantize for override in recipe.layer_overrides):
        return recipe, None
    explicit = {override.fqn for override in recipe.layer_overrides}
    kept: list[str] = []
    for tied in tied_parameters(model):
        quantized = [fqn for fqn, module, _ in tied if layer_decision(module, fqn, recipe)[1]]
        if quantized and len(quantized) < len(tied):
            kept += [fqn for fqn in quantized if fqn not in explicit]
    if not kept:
        return recipe, None
    overrides = recipe.layer_overrides + tuple(LayerOverride(fqn, None, tied=True) for fqn in kept)
    return replace(recipe, layer_overrides=overrides), (
        f"{first_names(kept)} kept in {recipe.dtype}: tied to a layer the recipe leaves alone, so quantizing it "
        "would store a second copy; name it in a [[recipe.layer]] table to quantize it anyway")


def untied(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe without the layers keep_ties kept float, and their names: for a runtime that stores a tied
    weight twice anyway (ExecuTorch's XNNPACK packs a delegated Linear's weight into its own blob)."""
    dropped = [override.fqn for override in recipe.layer_overrides if override.tied]
    if not dropped:
        return recipe, []
    return replace(recipe, layer_overrides=tuple(o for o in recipe.layer_overrides if not o.tied)), dropped


def quantize_per_layer(model: nn.Module, recipe: Recipe, weightless: bool = False,
                       after_layer: Callable[[nn.Module], None] | None = None) -> list[str]:
    """Apply a mixed recipe with torchao's FqnToConfig, one config per module the decision quantizes.

    weightless: on a meta model, skip schemes that cannot run there. Returns the fqns left float for that.
    after_layer(model), when given, runs after each layer (FqnToConfig of that layer alone)."""
    from collections import OrderedDict

    from torchao.quantization import FqnToConfig, quantize_

    configs: OrderedDict[str, Any] = OrderedDict()
    skipped = []
    for fqn, module in model.named_modules():
        layer_recipe, quantized, _ = layer_decision(module, fqn, recipe)
        if not quantized:
            continue
        scheme = layer_recipe.scheme
        assert scheme is not None
        missing = scheme.missing_kernel()
        if missing:
            raise UnsupportedRecipe(f"layer {fqn} needs CUDA: {missing}")
        if weightless and not scheme.weightless_ok:
            skipped.append(fqn)
            continue
        configs[fqn] = scheme.make_config(layer_recipe)
    if after_layer is None:
        if configs:
            quantize_(model, FqnToConfig(configs), filter_fn=None)
        return skipped
    for fqn, config in configs.items():
        quantize_(model, FqnToConfig(OrderedDict([(fqn, config)])), filter_fn=None)
        after_layer(model)
    return skipped


def prunable(module: nn.Module, recipe: Recipe) -> bool:
    weight = getattr(module, "weight", None)
    return (bool(recipe.prune) and bool(_type_names(module) & set(recipe.prune_layers))
            and isinstance(weight, torch.Tensor) and weight.is_floating_point())


# ---- applying a recipe to a real model ----

def apply_recipe(model: nn.Module, recipe: Recipe, *, after_layer: Callable[[nn.Module], None] | None = None,
                 prune_thresholds: PruneThresholds | None = None) -> tuple[nn.Module, list[str]]:
    """Prune, cast, quantize, in that order (quantizing first would leave nothing to prune).

    Casting and quantizing go one layer at a time, calling after_layer(model) after each, so the caller can
    give back what the layer no longer needs (planner.core.pages) before the next one is made. prune_thresholds
    caches each layer's magnitude threshold across recipes pruning the same reference by the same share.
    Returns the model and notes measured while applying (the share of pruned weights now zero)."""
    notes = []
    if recipe.prune:
        zeros, total = _magnitude_prune(model, recipe, prune_thresholds)
        if total:
            # Without quantization the torch artifact stores them sparse (planner.analysis.pruning.artifact_state).
            storage = ("stored sparse where smaller (the file shrinks), loaded dense (memory does not)"
                       if recipe.scheme is None else "stored densely: file and memory do not shrink")
            notes.append(f"{zeros / total:.0%} of pruned weights are zero, {storage}")
    _cast_by_layer(model, recipe.torch_dtype, after_layer)
    scheme = recipe.scheme
    if recipe.quantizes and linearize_conv1d(model, recipe):
        notes.append(CONV1D_LINEARIZED_NOTE)
    if recipe.layer_overrides:
        quantize_per_layer(model, recipe, after_layer=after_layer)
    elif scheme is not None:
        missing = scheme.missing_kernel()
        if missing:
            raise UnsupportedRecipe(f"needs CUDA: {missing}")
        chosen = layer_filter(recipe)
        probes = ZeroProbes()
        for fqn in [fqn for fqn, module in model.named_modules() if chosen(module, fqn)]:
            probe = probes.before(model.get_submodule(fqn)) if recipe.prune else None
            scheme.quantize_layer(model, fqn, recipe)
            if probe is not None:
                probes.after(model.get_submodule(fqn), probe)
            if after_layer is not None:
                after_layer(model)
        notes += probes.notes(recipe)
    return model, notes


# Input columns of a pruned Linear whose weights are read back after quantizing (ZeroProbes).
PROBE_COLUMNS = 32


@dataclass
class ZeroProbes:
    """Whether quantizing kept a pruned layer's zeros. torchao's int4 (an asymmetric scheme whose zero point is not
    an integer) computes a pruned zero as a small nonzero value; over ComplexNet's 0.5M-input Linear the errors add
    up: prune50-int4-g128 measured -19.7 dB against prune50's 6.7 dB, where its ONNX twin, which keeps zeros,
    measured 6.6 dB. Each pruned Linear's first PROBE_COLUMNS input columns are read back through the quantized
    layer (a unit input per column), which works for any weight layout the layer can run."""

    zeros: int = 0
    kept: int = 0
    zero_magnitude: float = 0.0
    weight_magnitude: float = 0.0
    weights: int = 0
    layers: int = 0

    def before(self, module: nn.Module) -> torch.Tensor | None:
        """Where the layer's first input columns are zero (a new tensor: no view keeps the weight alive)."""
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
            return None
        mask = weight.detach()[:, :PROBE_COLUMNS] == 0
        return mask if bool(mask.any()) else None

    def after(self, module: nn.Module, mask: torch.Tensor) -> None:
        count, width = mask.shape[1], module.in_features
        dtype = module.weight.dtype if module.weight.is_floating_point() else torch.float32
        try:
            with torch.no_grad():
                units = torch.zeros(count + 1, width, dtype=dtype)
                units[torch.arange(count), torch.arange(count)] = 1
                out = module(units).float()
        except Exception:  # noqa: BLE001 - a layout that cannot run here says nothing about zeros
            return
        read = (out[:count] - out[count]).T  # (out_features, count): the columns as the layer computes with them
        self.layers += 1
        self.zeros += int(mask.sum())
        self.kept += int((read[mask] == 0).sum())
        self.zero_magnitude += float(read[mask].abs().sum())
        self.weight_magnitude += float(read[~mask].abs().sum())
        self.weights += int((~mask).sum())

    def notes(self, recipe: Recipe) -> list[str]:
        if not self.zeros or self.kept >= 0.99 * self.zeros:
            return []
        size = (self.zero_magnitude / self.zeros) / max(self.weight_magnitude / max(self.weights, 1), 1e-30)
        return [f"{recipe.quantize} kept {self.kept / self.zeros:.0%} of the pruned zeros (read back on "
                f"{PROBE_COLUMNS} input columns of {self.layers} layer(s)): the rest compute as nonzero values, on "
                f"average {size:.0%} the size of the kept weights, so the quantized layers are no longer sparse"]


def _cast_by_layer(model: nn.Module, dtype: torch.dtype, after_layer: Callable[[nn.Module], None] | None) -> None:
    """model.to(dtype), one module's own floating parameters and buffers at a time."""
    for module in model.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if not any(t.is_floating_point() and t.dtype != dtype for t in own):
            continue
        module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)
        if after_layer is not None:
            after_layer(model)


class UnsupportedRecipe(Exception):
    """The recipe cannot run here (missing kernel or unsupported model kind); the row says why."""


def _magnitude_prune(model: nn.Module, recipe: Recipe,
                     thresholds: PruneThresholds | None = None) -> tuple[int, int]:
    """Per-layer L1 magnitude pruning: zero the smallest `recipe.prune` share of each weight, in place.

    In place keeps tied weights tied (GPT-2's lm_head and wte); weights memory-mapped from the reference
    file are private mappings, so the file is untouched. torch.nn.utils.prune would do the same through
    topk indices and a full mask, several times the weight in memory (over 20 GB for ComplexNet's
    537M-value fc1); a threshold search does not. Returns (weights now zero, weights in pruned layers).
    """
    zeros = total = 0
    done: set[int] = set()
    thresholds = {} if thresholds is None else thresholds
    for name, module in model.named_modules():
        if not prunable(module, recipe) or id(module.weight) in done or module.weight.device.type == "meta":
            continue
        done.add(id(module.weight))
        weight = module.weight.data
        flat = weight.view(-1) if weight.is_contiguous() else weight.contiguous().view(-1)
        # The weights a threshold was searched on: the reference, after this recipe's structured pruning if any.
        key = (name, recipe.prune, recipe.channels, recipe.params, tuple(weight.shape))
        if key not in thresholds:
            thresholds[key] = magnitude_threshold(flat, recipe.prune)
        threshold = thresholds[key]
        for chunk in flat.split(PRUNE_CHUNK):
            pruned = chunk.abs() <= threshold  # one pass: the same mask zeroes and counts
            chunk.masked_fill_(pruned, 0)
            zeros += int(torch.count_nonzero(pruned))  # far faster than a bool sum
        if flat.data_ptr() != weight.data_ptr():
            weight.copy_(flat.view_as(weight))
        total += weight.numel()
    return zeros, total


# Magnitude thresholds already searched in this plan: (layer, prune share, structured shares, shape) -> value.
PruneThresholds = dict[tuple[str, float, float, float, tuple[int, ...]], float]
PRUNE_CHUNK = 1 << 24
THRESHOLD_SAMPLE = 1 << 18


def magnitude_threshold(weight: torch.Tensor, fraction: float, sample_size: int = THRESHOLD_SAMPLE) -> float:
    """The k-th smallest |w| for k = ceil(fraction · n): zeroing |w| <= it prunes at least that share.

    Exact, chunked and fast: a strided sample brackets the k-th value, one pass counts what lies below the
    bracket and keeps the few values inside it, and the k-th value is found among those (a full sort or
    topk on a 537M-value layer needs gigabytes; abs() over it several times takes seconds). A bracket the
    sample got wrong is detected by the exact count and falls back to a histogram search.
    """
    values = weight.detach().reshape(-1)
    wanted = math.ceil(fraction * values.numel())
    if wanted <= 0:
        return -1.0
    if values.numel() <= sample_size:
        return float(values.abs().float().kthvalue(wanted).values)
    step = values.numel() // sample_size
    sample = values[::step].abs().float()
    # Four standard deviations of the sample quantile on each side, plus one sample for rounding.
    margin = 4 * math.sqrt(fraction * (1 - fraction) / sample.numel()) + 1 / sample.numel()
    low = float(sample.kthvalue(max(1, math.floor((fraction - margin) * sample.numel()))).values)
    high = float(sample.kthvalue(min(sample.numel(), math.ceil((fraction + margin) * sample.numel()))).values)
    found = _kth_in_bracket(values, wanted, low, high)
    return found if found is not None else _kth_by_histogram(values, wanted)


def _kth_in_bracket(values: torch.Tensor, wanted: int, low: float, high: float) -> float | None:
    """The wanted-th smallest |v| if it lies in [low, high], else None; one abs() per chunk."""
    below = 0
    inside = []
    for chunk in values.split(PRUNE_CHUNK):
        magnitude = chunk.abs()
        below += int(torch.count_nonzero(magnitude < low))
        inside.append(magnitude[(magnitude >= low) & (magnitude <= high)])
    candidates = torch.cat(inside)
    if not 1 <= wanted - below <= candidates.numel():
        return None
    return float(candidates.float().kthvalue(wanted - below).values)


def _kth_by_histogram(values: torch.Tensor, wanted: int) -> float:
    """The same k-th value in bounded memory for any distribution: the maximum, a histogram of magnitudes,
    then an exact search in the bin that holds it."""
    chunks = values.split(PRUNE_CHUNK)
    top = max(float(chunk.abs().max()) for chunk in chunks)
    if top == 0:
        return 0.0
    bins = 1 << 16
    counts = sum(torch.histc(chunk.float().abs(), bins=bins, min=0.0, max=top) for chunk in chunks)
    index = int(torch.searchsorted(counts.cumsum(0), torch.tensor(float(wanted))))
    # Bin edges as histc computes them may round differently: widen by one bin each side.
    found = _kth_in_bracket(values, wanted, top * max(index - 1, 0) / bins, top * min(index + 2, bins) / bins)
    if found is None:  # never seen; exactness matters more than memory here
        return float(values.abs().float().kthvalue(wanted).values)
    return found
