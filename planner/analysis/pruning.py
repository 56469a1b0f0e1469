"""Structured pruning with torch-pruning's dependency graph: channels and neurons are removed, and every layer
that consumes them is rewired, so tensors really shrink. Plus the analytic twin of both kinds of pruning.

- `prune_channels` removes `recipe.channels` of the channels of every dependency group (L1 magnitude
  importance, local per group). The layers that produce the model's outputs keep their output dimension
  (their groups are left alone), so outputs stay comparable with float32.
- The same call on the meta model with a weight-free importance gives the pruned shapes without weights:
  how many channels a group loses depends on the ratio only, not on which ones.
- `resolve_recipe` turns a `params` target (share of parameters to remove) into the channel ratio that
  reaches it, by bisection on the meta model.
- The artifact is the pruned state dict plus a JSON description of the changed module attributes and tensor
  shapes (under STRUCTURE_KEY, a plain string: loading stays weights_only); `rebuild` applies it to the
  source's weightless architecture before the weights are assigned.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import itertools
import json
import math
import operator
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from planner.analysis import sparse
from planner.analysis.footprint import CONTAINER_BYTES_PER_STORAGE, Footprint, analytic_footprint
from planner.core.units import format_bytes
from planner.models.hf_folder import kv_cache_off, meta_sequences_unpacked
from planner.recipes.recipe import Recipe, UnsupportedRecipe, prunable, tied_parameters

if TYPE_CHECKING:
    from planner.analysis.generation import GenerationSpec

STRUCTURE_KEY = "__planner_structure__"
MAX_CHANNEL_RATIO = 0.95  # torch-pruning keeps at least one channel per group; beyond this, layers degenerate
SOLVE_TOLERANCE = 0.01  # share of parameters: a `params` target is met within one percent
SOLVE_STEPS = 4
PROBE_RATIO = 0.5
# Attribute values recorded when pruning changes them (torch-pruning updates in/out_features, num_features, ...).
SIMPLE_TYPES = (int, float, bool, str)


def _importance(weightless: bool) -> Any:
    import torch_pruning as tp

    class WeightFree(tp.importance.Importance):
        """Any order will do for shapes and bytes: the count removed per group depends on the ratio only."""

        def __call__(self, group: Any) -> torch.Tensor:
            return torch.arange(len(group[0][1]), dtype=torch.float32)

    return WeightFree() if weightless else tp.importance.MagnitudeImportance(p=1)


def _tensors(output: Any) -> list[torch.Tensor]:
    from planner.measure.library import floating_tensors

    return floating_tensors(output)


# What a transformers ModelOutput carries beside the model's result. The KV cache in particular links every
# key/value projection to the output, and torch-pruning's grouping then explodes (minutes on a 2-layer Llama).
_AUXILIARY_OUTPUTS = frozenset({"past_key_values", "hidden_states", "attentions", "cross_attentions"})


def _result_tensors(output: Any) -> list[torch.Tensor]:
    """The output tensors pruning must keep comparable: a ModelOutput's result fields, else every float tensor."""
    if isinstance(output, Mapping):
        output = [value for key, value in output.items() if key not in _AUXILIARY_OUTPUTS]
    return _tensors(output)


def output_layers(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[list[nn.Module], list[list[int]]]:
    """The layers whose results reach the model's outputs without passing another layer with parameters
    (classifier, LM head, final norm), found from the autograd graph of one forward; and the output shapes."""
    producers: dict[Any, nn.Module] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        for tensor in _tensors(output):
            if tensor.grad_fn is not None:
                producers[tensor.grad_fn] = module

    handles = [m.register_forward_hook(hook) for m in model.modules() if any(True for _ in m.parameters(False))]
    try:
        with torch.enable_grad():
            outputs = _result_tensors(model(*inputs))
    finally:
        for handle in handles:
            handle.remove()
    found: list[nn.Module] = []
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in producers:
            if producers[node] not in found:
                found.append(producers[node])
            continue
        stack += [parent for parent, _ in node.next_functions if parent is not None]
    return found, [list(t.shape) for t in outputs]


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """{q/k/v projection: heads} for transformers attention modules (BERT and Llama naming), so that
    torch-pruning removes whole heads and the heads' reshapes (view(..., -1, head_size)) still hold."""
    heads: dict[nn.Module, int] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        query_heads = getattr(module, "num_attention_heads", None) or getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or query_heads
        for names, count in ((("query", "q_proj"), query_heads), (("key", "value", "k_proj", "v_proj"), kv_heads)):
            for name in names:
                layer = getattr(module, name, None)
                if isinstance(layer, nn.Linear) and isinstance(count, int):
                    heads[layer] = count
    return heads


def unknown_layers(model: nn.Module) -> list[str]:
    """Layer types with a matrix weight that torch-pruning has no pruner for: it would cut them along a guessed
    dimension (transformers' Conv1D stores its weight transposed), so the model would be silently wrong."""
    import torch_pruning as tp

    graph = tp.DependencyGraph()  # only its registry of pruners is used
    # Unknown module types fall through to the element-wise pruner, which knows no weight layout.
    return sorted({type(module).__name__ for module in model.modules()
                   if (graph.get_pruner_of_module(module) is None
                       or tp.ops.module2type(module) == tp.ops.OPTYPE.ELEMENTWISE)
                   and any(p.dim() >= 2 for p in module.parameters(recurse=False))})


def _scalar_attributes(model: nn.Module) -> dict[str, dict[str, Any]]:
    attributes: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        values = {}
        for key, value in vars(module).items():
            if key.startswith("_"):
                continue
            if isinstance(value, SIMPLE_TYPES) or (isinstance(value, tuple) and all(isinstance(v, int) for v in value)):
                values[key] = value
        attributes[name] = values
    return attributes


def _rounding(recipe: Recipe) -> tuple[int | None, int | None]:
    """What a pruned width must be a multiple of for the recipe's scheme to take the layer: the scheme's own
    multiple (torchao's CPU int4 kernel: out_features % 16), and its group size (a grouped scheme leaves a layer
    whose in_features do not split into whole groups in the model dtype)."""
    scheme = recipe.scheme
    if scheme is None:
        return None, None
    return scheme.width_multiple, recipe.group_size if "group_size" in scheme.settings_keys else None


def pruning_key(recipe: Recipe) -> str:
    """What a structured pruning of given weights depends on, as a file name part: the channel ratio and the
    rounding (struct50-int4-g128 on torch and on ONNX Runtime prune alike; struct50-int8-dynamic does not round)."""
    multiple, group = _rounding(recipe)
    return f"c{recipe.channels:.6f}-m{multiple or 0}-g{group or 0}"


def round_to(recipe: Recipe, model: nn.Module, ignored: list[nn.Module]) -> int | None:
    """torch-pruning's round_to for the recipe on this model: widths a multiple of the scheme's multiple and of its
    group size where every pruned layer keeps at least that many (a Llama-3-8B's struct50-int4-g128 left its 32
    down_proj in bfloat16, 4784 inputs not divisible by 128); else of the scheme's multiple alone (ComplexNet's
    64-channel convolutions would be pruned away whole by a round_to of 128)."""
    multiple, group = _rounding(recipe)
    if group is None:
        return multiple
    combined = math.lcm(multiple or 1, group)
    kept = [int(width * (1 - recipe.channels)) for module in model.modules() if module not in ignored
            for width in [getattr(module, "out_features", None) or getattr(module, "out_channels", None)]
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(width, int)]
    return combined if kept and min(kept) >= combined else multiple


def prune_channels(model: nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe,
                   weightless: bool = False) -> dict[str, Any]:
    """Remove `recipe.channels` of every prunable dependency group's channels, in place. Returns the structure
    (changed attributes and tensor shapes) that `rebuild` applies to the unpruned architecture.
    Raises UnsupportedRecipe, naming the reason, where the result would not be a correct, comparable model."""
    unknown = unknown_layers(model)
    if unknown:
        raise UnsupportedRecipe(f"structured pruning: torch-pruning has no pruner for {', '.join(unknown)}, it would "
                                "cut those weights along a guessed dimension")
    model.eval()
    # Pruning compares the model's result, not its KV cache, and torch-pruning's grouping explodes on the cache
    # updates (over 5 minutes on a 2-layer Llama, against 5 s without).
    with kv_cache_off(model), meta_sequences_unpacked():
        return _prune_channels(model, inputs, recipe, weightless)


# Flatten index mappings memoized across the prunings of one plan's analysis (see memoized_flatten_mapping), cleared
# after it: a few entries, each up to one Linear's inputs of index tuples (ComplexNet: 524,288, roughly 50 MB).
FLATTEN_MEMO_ENTRIES = 8
_FLATTEN_MEMO: dict[tuple[Any, ...], list[Any]] = {}


def clear_flatten_memo() -> None:
    """Give back the memoized mappings once the plan's analysis is done (the planner then verifies for minutes)."""
    _FLATTEN_MEMO.clear()


def flatten_mapping(stride: int, reverse: bool, idxs: Any) -> list[Any]:
    """torch-pruning's `_FlattenIndexMapping.__call__`, element for element and in the same order, with the
    tuples made by C loops (map, zip) rather than a Python comprehension: 3x faster on 0.5M indices."""
    from torch_pruning._helpers import _HybridIndex

    make = functools.partial(tuple.__new__, _HybridIndex)
    if reverse:
        # The same pairs inserted in the same order as the original's make the same set, iterated the same way.
        channels = map(operator.floordiv, map(operator.itemgetter(0), idxs), itertools.repeat(stride))
        return list(set(map(make, zip(channels, map(operator.itemgetter(1), idxs), strict=True))))
    flattened: list[Any] = []
    for index, root in idxs:
        flattened.extend(map(make, zip(range(index * stride, (index + 1) * stride), itertools.repeat(root))))
    return flattened


@contextlib.contextmanager
def fast_flatten_mapping() -> Iterator[None]:
    """torch-pruning maps a flattened Linear's input indices to channels one Python tuple per index, and builds
    the same groups again at every get_all_groups: 11M tuples a pruning of ComplexNet (a 524,288-input Linear).
    The mapping is a pure function of (stride, direction, indices) whose results are immutable tuples, so each
    result is computed by `flatten_mapping`, memoized, and handed out as a fresh list, across a solve's prunings.
    The cyclic garbage collector is paused meanwhile: its full passes over millions of live tuples were half of
    a pruning's time (12.4 -> 6.1 s), and the tuples hold no cycles (they are freed by reference counting)."""
    from torch_pruning.dependency import index_mapping

    mapping = getattr(index_mapping, "_FlattenIndexMapping", None)
    original = vars(mapping).get("__call__") if mapping is not None else None
    if mapping is None or original is None:  # another torch-pruning: nothing to speed up
        yield
        return

    def memoized(self: Any, idxs: Any) -> list[Any]:
        key = (self._stride, self.reverse, tuple(idxs))
        if key not in _FLATTEN_MEMO:
            while len(_FLATTEN_MEMO) >= FLATTEN_MEMO_ENTRIES:
                _FLATTEN_MEMO.pop(next(iter(_FLATTEN_MEMO)))
            _FLATTEN_MEMO[key] = flatten_mapping(self._stride, bool(self.reverse), idxs)
        return list(_FLATTEN_MEMO[key])

    from torch_pruning.dependency.group import Group

    original_merge = vars(Group).get("add_and_merge")

    def merge(self: Any, dep: Any, idxs: list[Any]) -> None:
        # Most merges of a flattened Linear's inputs add the indices the group already holds, in another order
        # (each path through the pool and the flatten reaches fc1 again). The original keeps the first of each
        # index over held + new, i.e. the held list itself when it has no repeats; its Python loop over 1M tuples
        # took 2 of a pruning's 5 s, the set operations here a tenth of that.
        from torch_pruning._helpers import GroupItem

        for position, (held_dep, held) in enumerate(self._group):
            if held_dep.target == dep.target and held_dep.handler == dep.handler:
                held_keys = keys_of(held)
                if len(held_keys) == len(held) and held_keys.issuperset(map(operator.itemgetter(0), idxs)):
                    merged = list(held)
                    remember_keys(merged, held_keys)
                    self._group[position] = GroupItem(dep=held_dep, idxs=merged)
                    return
                break
        original_merge(self, dep, idxs)

    # The index set of the last few merged lists: the same list is merged into again and again.
    known_keys: dict[int, tuple[list[Any], set[int]]] = {}

    def remember_keys(held: list[Any], keys: set[int]) -> None:
        while len(known_keys) >= 4:
            known_keys.pop(next(iter(known_keys)))
        known_keys[id(held)] = (held, keys)

    def keys_of(held: list[Any]) -> set[int]:
        entry = known_keys.get(id(held))
        if entry is not None and entry[0] is held:
            return entry[1]
        keys = set(map(operator.itemgetter(0), held))
        remember_keys(held, keys)
        return keys

    collecting = gc.isenabled()
    gc.disable()
    mapping.__call__ = memoized
    if original_merge is not None:
        Group.add_and_merge = merge
    try:
        yield
    finally:
        mapping.__call__ = original
        if original_merge is not None:
            Group.add_and_merge = original_merge
        if collecting:
            gc.enable()


# A dependency group lists a layer or operation once per distinct index set reaching it. Measured on the zoo,
# the examples' GPT-2, BERT, ResNet-50, MobileNetV2 and a 4-layer Llama: at most 4.6 entries per module of the model.
MAX_GROUP_ENTRIES_PER_MODULE = 32
MIN_GROUP_ENTRIES = 1000


class DependencySearchDiverged(Exception):
    """torch-pruning's search for one group did not converge: the recipe cannot be analysed on this model."""


@contextlib.contextmanager
def bounded_dependency_search(module_count: int) -> Iterator[None]:
    """torch-pruning follows dependencies until it meets a (node, function, indices) it already holds. Through a
    cycle whose index mapping shifts the indices, it never does: on Llama-style attention with two query heads per
    KV head (Qwen2 4/2, 8/4 and 2/1 heads; 8/2 and 16/4 converge), the rotary half-rotation's slices and concat,
    met again through repeat_kv, bring indices 64 higher every lap, and the search ran over 15 minutes with its
    group past 6,000 entries (torch-pruning's issue 527: Qwen3-8B). A group past MAX_GROUP_ENTRIES_PER_MODULE
    entries per module of the model stops the search with DependencySearchDiverged, in seconds."""
    from torch_pruning.dependency.group import Group

    original_add = vars(Group).get("add_dep")
    if original_add is None:  # another torch-pruning: nothing to bound
        yield
        return
    limit = max(MIN_GROUP_ENTRIES, MAX_GROUP_ENTRIES_PER_MODULE * module_count)

    def add_dep(self: Any, dep: Any, idxs: Any) -> None:
        if len(self._group) >= limit:
            raise DependencySearchDiverged(
                f"dependency search did not converge on this model: a group passed {limit} entries, its indices "
                "shifting around a cycle (seen on attention with 2 query heads per KV head)")
        original_add(self, dep, idxs)

    Group.add_dep = add_dep
    try:
        yield
    finally:
        Group.add_dep = original_add


def _prune_channels(model: nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe, weightless: bool
                    ) -> dict[str, Any]:
    with fast_flatten_mapping(), bounded_dependency_search(sum(1 for _ in model.modules())):
        return _prune_channels_mapped(model, inputs, recipe, weightless)


def _prune_channels_mapped(model: nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe, weightless: bool
                           ) -> dict[str, Any]:
    import torch_pruning as tp

    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    inputs = tuple(t.to(device) for t in inputs)
    heads = attention_heads(model)
    before = _scalar_attributes(model)
    ties = tied_parameters(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ignored, shapes_before = output_layers(model, inputs)
            pruner = tp.pruner.BasePruner(
                model, inputs, importance=_importance(weightless), pruning_ratio=recipe.channels,
                ignored_layers=ignored, round_to=round_to(recipe, model, ignored), num_heads=heads,
                prune_num_heads=bool(heads), prune_head_dims=not heads,
                head_pruning_ratio=recipe.channels if heads else 0.0,
                output_transform=_result_tensors)
            pruner.step()
        except DependencySearchDiverged as error:  # not a matter of meta tensors: no real-tensor retry
            raise UnsupportedRecipe(f"structured pruning: torch-pruning's {error}") from error
        except Exception as error:
            where = "weightless (meta)" if weightless else "on the real weights"
            message = str(error).strip().splitlines()[0][:160] if str(error).strip() else "(no message)"
            raise UnsupportedRecipe(f"torch-pruning cannot prune this model {where}: {type(error).__name__}: "
                                    f"{message}") from error
    _update_head_counts(model, heads)
    retie(ties, weightless)
    try:
        with torch.no_grad():
            shapes_after = [list(t.shape) for t in _result_tensors(model(*inputs))]
    except Exception as error:
        raise UnsupportedRecipe(f"the structurally pruned model does not run: {type(error).__name__}: "
                                f"{str(error)[:160]}") from error
    if shapes_after != shapes_before:
        raise UnsupportedRecipe(f"structured pruning changed the output shapes {shapes_before} -> {shapes_after}")
    return structure_of(model, before)


def retie(ties: list[list[tuple[str, nn.Module, str]]], weightless: bool) -> None:
    """torch-pruning gives each holder of a tied weight its own pruned Parameter: the tie is gone, and a tied
    small LM's pruned file and memory held its embedding twice (a Qwen2 folder's struct50: 78 MB where 45 MB
    would do). Where every holder was pruned to the same shape (and, on real weights, the same values), they
    share one Parameter again."""
    for group in ties:
        _, first_module, first_attribute = group[0]
        shared = getattr(first_module, first_attribute)
        others = [getattr(module, attribute) for _, module, attribute in group[1:]]
        if all(other.shape == shared.shape and (weightless or shared.is_meta or torch.equal(other, shared))
               for other in others):
            for _, module, attribute in group[1:]:
                setattr(module, attribute, shared)


def _update_head_counts(model: nn.Module, heads: dict[nn.Module, int]) -> None:
    """Attention modules keep head counts in attributes; keep them true after whole heads go. BERT: the head
    count. Llama-style GQA: query heads per KV head (`num_key_value_groups`), which eager SDPA does not read
    (it broadcasts) but torch.export's and ONNX's path does, through repeat_kv: a Qwen2 with 8 query and 2 KV
    heads pruned to 4 query heads ran in torch and failed to export with 4 groups left."""
    for module in model.modules():
        query, size = getattr(module, "query", None), getattr(module, "attention_head_size", None)
        if query in heads and isinstance(size, int) and hasattr(module, "num_attention_heads"):
            module.num_attention_heads = query.out_features // size
            if hasattr(module, "all_head_size"):
                module.all_head_size = query.out_features
        query, key = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
        head_dim = getattr(module, "head_dim", None)
        if (query in heads and key in heads and isinstance(head_dim, int) and head_dim > 0
                and isinstance(getattr(module, "num_key_value_groups", None), int)):
            query_heads, kv_heads = query.out_features // head_dim, key.out_features // head_dim
            if kv_heads and query_heads % kv_heads == 0:
                module.num_key_value_groups = query_heads // kv_heads


def structure_of(model: nn.Module, before: dict[str, dict[str, Any]]) -> dict[str, Any]:
    after = _scalar_attributes(model)
    changed = {name: {key: value for key, value in values.items() if before.get(name, {}).get(key) != value}
               for name, values in after.items()}
    shapes = {key: list(tensor.shape) for key, tensor in model.state_dict(keep_vars=True).items()}
    return {"attributes": {name: values for name, values in changed.items() if values}, "shapes": shapes}


def rebuild(model: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Give a weightless (meta) unpruned model the pruned attributes and tensor shapes, ready for
    load_state_dict(assign=True)."""
    modules = dict(model.named_modules())
    for name, values in structure["attributes"].items():
        for key, value in values.items():
            setattr(modules[name], key, tuple(value) if isinstance(value, list) else value)
    # A tied weight gets one replacement, shared as the pruning kept it (the old tensor is held, so its id stays).
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, shape in structure["shapes"].items():
        owner_name, _, attr = key.rpartition(".")
        owner = modules[owner_name]
        current = getattr(owner, attr)
        if list(current.shape) == shape:
            continue
        _, replacement = replaced.get(id(current), (None, None))
        if replacement is None or list(replacement.shape) != shape:
            replacement = torch.empty(shape, dtype=current.dtype, device="meta")
            if isinstance(current, nn.Parameter):
                replacement = nn.Parameter(replacement, requires_grad=current.requires_grad)
            replaced[id(current)] = (current, replacement)
        if isinstance(current, nn.Parameter):
            owner._parameters[attr] = replacement
        else:
            owner._buffers[attr] = replacement
    return model


def unpack_artifact_state(model: nn.Module, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Apply a saved structure (structured pruning) and densify sparse weights; a plain state dict passes."""
    text = state.pop(STRUCTURE_KEY, None)
    if text is not None:
        rebuild(model, json.loads(text))
    return sparse.unpack_state_dict(model, state)


def artifact_state(model: nn.Module, recipe: Recipe, structure: dict[str, Any] | None) -> dict[str, Any]:
    """What the torch artifact stores: the state dict, pruned weights in their smallest form, the structure."""
    state: dict[str, Any] = model.state_dict()
    if recipe.prune and recipe.scheme is None:  # torchao tensors have their own layout: no sparse form
        state = sparse.pack_state_dict(state, sparse.pruned_weight_keys(model, recipe))
    if structure is not None:
        state[STRUCTURE_KEY] = json.dumps(structure, separators=(",", ":"))
    return state


# ---- the analytic twin ----

def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Pruning a meta model costs seconds where a flatten feeds a wide Linear (torch-pruning maps indices in Python):
# each (model, ratio, rounding) is pruned once per plan. Treat the returned model as read-only.
_PRUNED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


# The channel ratio that met a `params` target on a model, per (target, materialize): see resolve_recipe.
_SOLVED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[float, bool], float]] = weakref.WeakKeyDictionary()


def pruned_meta_model(meta_model: nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe, *,
                      materialize: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The recipe's structurally pruned model on meta, and its structure. Where the forward cannot run on meta
    (.item() in mask code) an uninitialised CPU copy is pruned instead, unless materialize is False (an
    analytic-only plan, whose point is models too big to build here): then the recipe is unsupported."""
    cache = _PRUNED.setdefault(meta_model, {})
    key: tuple[Any, ...] = (recipe.channels, *_rounding(recipe))
    if key not in cache:  # one pruning on meta, whoever asks (the analysis, then each runtime's describe)
        pruned = copy.deepcopy(meta_model)
        try:
            cache[key] = (pruned, prune_channels(pruned, inputs, recipe, weightless=True))
        except UnsupportedRecipe as error:
            cache[key] = error
    entry = cache[key]
    if isinstance(entry, UnsupportedRecipe) and "weightless (meta)" in str(entry):
        # some forwards need real tensors (a value read with .item())
        fallback = (*key, materialize)
        if fallback not in cache:
            cache[fallback] = _pruned_stand_in(meta_model, inputs, recipe) if materialize else UnsupportedRecipe(
                f"{entry}; pruning a real-tensor copy instead would need "
                f"{format_bytes(parameter_count(meta_model) * 4)}, and --analytic-only never builds one")
        entry = cache[fallback]
    if isinstance(entry, UnsupportedRecipe):
        raise entry
    return entry


def _pruned_stand_in(meta_model: nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe
                     ) -> tuple[nn.Module, dict[str, Any]] | UnsupportedRecipe:
    """Prune an uninitialised CPU copy (zeros: shapes are all that matter) and return it on meta again."""
    stand_in = copy.deepcopy(meta_model)
    ties = tied_parameters(stand_in)
    stand_in.to_empty(device="cpu")  # like .to() below, a new tensor per holder of a tied weight
    retie(ties, weightless=True)
    with torch.no_grad():
        for tensor in [*stand_in.parameters(), *stand_in.buffers()]:
            tensor.zero_()
    try:
        structure = prune_channels(stand_in, inputs, recipe, weightless=True)
    except UnsupportedRecipe as error:
        return error
    ties = tied_parameters(stand_in)
    on_meta = stand_in.to("meta")
    retie(ties, weightless=True)
    return on_meta, structure


def resolve_recipe(meta_model: nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe, *,
                   materialize: bool = True) -> tuple[Recipe, str]:
    """A `params` target (share of parameters to remove) becomes the channel ratio that reaches it. Returns the
    recipe with `channels` set and a note (or "").

    Pruning even a meta model takes a minute where a flatten feeds a 0.5M-input Linear (ComplexNet), so the
    solve prunes as few times as it can: each tensor keeps about (1 - ratio)^k of its values, k being how many
    of its dimensions are pruned (0, 1 or 2; measured from one probe pruning); the ratio that meets the target
    under that model is checked by pruning at it, and refined from there while it misses by more than
    SOLVE_TOLERANCE. A target no tried ratio meets within tolerance (width rounding moves the share in steps)
    takes the nearest tried one, with a note."""
    if not recipe.params or recipe.channels:
        return recipe, ""
    sizes = {name: param.numel() for name, param in meta_model.named_parameters()}
    total = sum(sizes.values())
    # A ratio that met this target for another recipe (struct50 before struct50-int4-g128, which only rounds
    # widths differently) is the first guess: one pruning confirms it, where a fresh solve takes three or four.
    solved = _SOLVED.setdefault(meta_model, {})
    known = solved.get((recipe.params, materialize))
    ratio = known if known is not None else PROBE_RATIO
    tried: dict[float, float] = {}  # ratio -> removed share, each pruning cached by pruned_meta_model
    # From a known ratio a miss is width rounding's step (ComplexNet: 16 channels of conv2 are 12% of the
    # parameters), which more tries rarely close: two, then the nearest.
    for _ in range(SOLVE_STEPS if known is None else 2):
        try:
            pruned, _ = pruned_meta_model(meta_model, inputs, dataclasses.replace(recipe, channels=ratio),
                                          materialize=materialize)
        except UnsupportedRecipe:  # pruning_footprint meets the same (cached) reason and marks the row unsupported
            return dataclasses.replace(recipe, channels=ratio), ""
        kept = {name: param.numel() for name, param in pruned.named_parameters()}
        tried[ratio] = 1 - sum(kept.values()) / total
        if abs(tried[ratio] - recipe.params) <= SOLVE_TOLERANCE:
            solved[(recipe.params, materialize)] = ratio
            return dataclasses.replace(recipe, channels=ratio), ""
        exponents = {name: math.log(kept[name] / size) / math.log(1 - ratio) if 0 < kept[name] < size else
                     (0.0 if kept[name] == size else 2.0) for name, size in sizes.items() if name in kept}
        next_ratio = solve_ratio(sizes, exponents, recipe.params)
        if next_ratio is None:
            most = dataclasses.replace(recipe, channels=MAX_CHANNEL_RATIO)
            try:
                share = 1 - parameter_count(pruned_meta_model(meta_model, inputs, most, materialize=materialize)[0]
                                            ) / total
            except UnsupportedRecipe:
                return most, ""
            return most, (f"at most {share:.0%} of the parameters can go while the outputs keep their shape "
                          f"(asked {recipe.params:.0%}): {MAX_CHANNEL_RATIO:.0%} of channels removed")
        if next_ratio in tried:  # the model points back at a tried ratio: widths move in steps (rounding)
            break
        ratio = next_ratio
    # Not met within SOLVE_TOLERANCE (widths rounded to a multiple move the share in steps): the nearest share
    # pruned so far, whose pruning is cached for the footprint, and a note saying how far it is.
    ratio = min(tried, key=lambda tried_ratio: abs(tried[tried_ratio] - recipe.params))
    multiple, group = _rounding(recipe)
    rounding = f"; widths are rounded to multiples of {multiple or group}" if multiple or group else ""
    if multiple and group:
        rounding += f" (or {math.lcm(multiple, group)}, where every pruned layer keeps that many)"
    return dataclasses.replace(recipe, channels=ratio), (
        f"removes {tried[ratio]:.0%} of the parameters, the nearest of {len(tried)} tries to the asked "
        f"{recipe.params:.0%}{rounding}")


def removed_share(sizes: dict[str, int], exponents: dict[str, float], ratio: float) -> float:
    """Share of parameters gone at `ratio` when tensor t keeps sizes[t] * (1 - ratio) ** exponents[t] values."""
    kept = sum(size * (1 - ratio) ** exponents.get(name, 0.0) for name, size in sizes.items())
    return 1 - kept / sum(sizes.values())


def solve_ratio(sizes: dict[str, int], exponents: dict[str, float], target: float) -> float | None:
    """The channel ratio whose removed share is `target` under the power model (bisection; None: unreachable)."""
    if removed_share(sizes, exponents, MAX_CHANNEL_RATIO) < target:
        return None
    low, high = 0.0, MAX_CHANNEL_RATIO
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if removed_share(sizes, exponents, middle) < target else (low, middle)
    return round(high, 4)


def pruning_footprint(meta_model: nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe, *,
                      materialize: bool = True, generation: GenerationSpec | None = None) -> Footprint:
    """analytic_footprint of the recipe's pruned model: structured pruning runs on the meta model first (weights,
    disk and activations then follow the smaller shapes); sparse storage changes the disk figure. `generation`:
    generate()'s figures at that context instead of one forward's."""
    structure = None
    if recipe.channels:
        try:
            pruned, structure = pruned_meta_model(meta_model, inputs, recipe, materialize=materialize)
        except UnsupportedRecipe as error:
            footprint = analytic_footprint(meta_model, inputs, dataclasses.replace(recipe, channels=0.0),
                                           generation=generation)
            footprint.unsupported = str(error)
            return footprint
        before, after = parameter_count(meta_model), parameter_count(pruned)
        footprint = analytic_footprint(pruned, inputs, recipe, generation=generation)
        # the structure is a string in the pickle: its text, the key and a few opcodes
        footprint.disk_bytes += len(json.dumps(structure, separators=(",", ":"))) + len(STRUCTURE_KEY) + 16
        footprint.notes.insert(0, f"structured: {recipe.channels:.0%} of channels removed, parameters "
                                  f"{before:,} -> {after:,} ({1 - after / before:.0%} fewer)")
        meta_model = pruned
    else:
        footprint = analytic_footprint(meta_model, inputs, recipe, generation=generation)
    if recipe.prune and recipe.scheme is None:
        _sparse_disk(footprint, meta_model, recipe)
    return footprint


def _sparse_disk(footprint: Footprint, meta_model: nn.Module, recipe: Recipe) -> None:
    """Replace each pruned weight's dense disk bytes by its chosen sparse form (nonzeros known exactly)."""
    counts = {name: 0 for name in sparse.FORMATS}
    seen: set[int] = set()
    for module in meta_model.modules():
        if not prunable(module, recipe) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        numel = module.weight.numel()
        choice = sparse.choose_format(numel, sparse.nonzeros_after_magnitude_pruning(numel, recipe.prune),
                                      recipe.dtype_bytes)
        counts[choice.format] += 1
        footprint.disk_bytes += choice.disk_bytes - (numel * recipe.dtype_bytes + CONTAINER_BYTES_PER_STORAGE)
    stored = ", ".join(f"{count} {name}" for name, count in counts.items() if count)
    footprint.notes.append(f"pruned weights stored as: {stored}; loaded dense, so runtime memory does not shrink")
