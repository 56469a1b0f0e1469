"""Hugging Face model folders (`save_pretrained`: config.json + safetensors) and `hf:org/name` from the local
cache, loaded with transformers itself so tied weights, sharded checkpoints and omitted tied keys are handled
the way transformers handles them.

* Weightless: the architecture class named in config.json is constructed under torch.device("meta"). Its
  parameters are float32 whatever the checkpoint's dtype, and `post_init` ties the head to the embedding as the
  config says, so the analytic footprint sees one tensor where the model has one.
* Real: `from_pretrained(dtype=float32, use_safetensors=True, local_files_only=True)`: safetensors only (never a
  pickle), upcast to float32 so the reference is really float32, nothing downloaded.
* Code: a config that names its own modelling code (`auto_map`) runs that code; only with --trust-code
  (`trust_remote_code=True`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from planner.core.errors import PlannerError
from planner.core.safe_io import check_regular_file
from planner.core.text import first_names

CONFIG = "config.json"
CONFIG_MAX_BYTES = 4 * 2**20
# What save_pretrained writes: one file, or shards listed in an index.
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
DEFAULT_TOKENS = 128  # sequence length of the example input of a text model when --input-shape is not given


def is_hf_spec(spec: str) -> bool:
    return spec.startswith("hf:") or (os.path.isdir(spec) and os.path.isfile(os.path.join(spec, CONFIG)))


def resolve_folder(spec: str) -> Path:
    """The folder a spec names: the path itself, or `hf:org/name`'s snapshot in the local cache (offline)."""
    if not spec.startswith("hf:"):
        return Path(spec).resolve()
    repo_id = spec.removeprefix("hf:")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:  # noqa: BLE001 - not cached, bad repo id: both mean the same to the user
        raise PlannerError(f"{spec}: not in the local Hugging Face cache ({type(exc).__name__}); the planner never "
                           f"downloads: fetch it first (huggingface-cli download {repo_id}) or pass its folder"
                           ) from None


def read_config(folder: Path, display: str) -> dict[str, Any]:
    text = check_regular_file(folder / CONFIG, f"{display}: {CONFIG}", CONFIG_MAX_BYTES).read_text()
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise PlannerError(f"{display}: {CONFIG} is not valid JSON ({exc}); re-save it with save_pretrained"
                           ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise PlannerError(f"{display}: {CONFIG} has no model_type, so it is not a transformers config; "
                           "re-save the model with save_pretrained")
    return config


def check_folder(folder: Path, display: str, trust_code: bool, weightless: bool = False) -> dict[str, Any]:
    """The config, after checking the folder holds safetensors weights and names no code it may not run.
    weightless (an analytic-only plan, inspect): config.json alone is enough, as for a published shape whose
    weights are not here."""
    config = read_config(folder, display)
    if config.get("auto_map") and not trust_code:
        raise PlannerError(f"{display}: {CONFIG} names its own modelling code (auto_map), which would run here; "
                           "re-run with --trust-code if you trust it")
    if weightless and not any((folder / name).is_file() for name in PICKLED):
        return config
    if not any((folder / name).is_file() for name in SAFETENSORS):
        pickled = [name for name in PICKLED if (folder / name).is_file()]
        if pickled:
            raise PlannerError(f"{display} holds weights only as a pickle ({pickled[0]}), which can run code; "
                               "convert them to safetensors (save_pretrained(..., safe_serialization=True))")
        raise PlannerError(f"{display} has {CONFIG} but no model.safetensors; save the weights with "
                           "save_pretrained into the same folder")
    return config


@contextmanager
def kv_cache_off(model: nn.Module) -> Iterator[bool]:
    """Switch a transformers model's KV cache off (use_cache, on by default) for the duration; yields whether
    there was one to switch off. Exports and pruning need the model's result, not its cache: torch.export cannot
    return a DynamicCache, and torch-pruning's grouping explodes on the cache updates."""
    config = getattr(model, "config", None)
    saved = getattr(config, "use_cache", None)
    if saved:
        config.use_cache = False
    try:
        yield bool(saved)
    finally:
        if saved:
            config.use_cache = saved


@contextmanager
def meta_sequences_unpacked() -> Iterator[None]:
    """transformers' mask code asks whether the position ids pack several sequences into a row (`.item()` on
    them), which a meta tensor cannot answer, so no decoder LM could be pruned on meta: an analytic-only plan
    had no structured-pruning rows for any of them. A planner's example input holds one sequence per row, so on
    meta the answer is "not packed" (None, as transformers itself answers for unpacked ids)."""
    masking = sys.modules.get("transformers.masking_utils")  # not imported: not a transformers model
    original = getattr(masking, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return

    def unpacked_on_meta(position_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        if getattr(position_ids, "is_meta", False):
            return None
        return original(position_ids, *args, **kwargs)

    masking.find_packed_sequence_indices = unpacked_on_meta
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _architecture(folder: Path, display: str, trust_code: bool) -> tuple[Any, Any]:
    """(config object, the model class config.json names), resolving only transformers' own classes unless
    trusted (remote code goes through the Auto classes with trust_remote_code)."""
    import transformers

    with _quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                             trust_remote_code=trust_code)
        except Exception as exc:  # noqa: BLE001 - unknown model_type, bad values
            raise PlannerError(f"{display}: transformers cannot read {CONFIG} ({type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
                               f"upgrade transformers or re-save the model") from None
    names = [name for name in (getattr(config, "architectures", None) or []) if isinstance(name, str)]
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        cls = transformers.AutoModel
    return config, cls


def build(folder: Path, display: str, trust_code: bool, meta: bool) -> nn.Module:
    config, cls = _architecture(folder, display, trust_code)
    with _quiet_transformers():
        if meta:
            with torch.device("meta"):
                if cls.__name__.startswith("Auto"):
                    return cls.from_config(config, trust_remote_code=trust_code, dtype=torch.float32)
                return cls(config)  # float32 (torch's default dtype) whatever config.dtype says; ties weights
        try:
            model, info = cls.from_pretrained(str(folder), config=config, dtype=torch.float32,
                                              use_safetensors=True, local_files_only=True,
                                              trust_remote_code=trust_code, output_loading_info=True)
        except Exception as exc:  # noqa: BLE001 - damaged safetensors, shape mismatches
            raise PlannerError(f"{display}: loading the weights failed ({type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
                               "re-save the model with save_pretrained") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise PlannerError(f"{display}: the weights lack {first_names(missing)}, which would be random; "
                           "re-save the model with save_pretrained")
    return model


def example_inputs(config: dict[str, Any], display: str) -> tuple[torch.Tensor, ...]:
    """A plausible input from the config: token ids for a text model, an image for a vision model."""
    generator = torch.Generator().manual_seed(0)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vocab = text.get("vocab_size")
    if isinstance(vocab, int) and vocab > 0:
        positions = text.get("max_position_embeddings") or text.get("n_positions") or DEFAULT_TOKENS
        length = min(DEFAULT_TOKENS, int(positions))
        return (torch.randint(0, vocab, (1, length), generator=generator),)
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else config
    size, channels = vision.get("image_size"), vision.get("num_channels")
    if isinstance(size, int) and isinstance(channels, int):
        return (torch.randn(1, channels, size, size, generator=generator),)
    raise PlannerError(f"{display}: no example input can be inferred from {CONFIG}; pass --input-shape "
                       "(and --input-dtype int64 for token ids)")


__all__ = ["build", "check_folder", "example_inputs", "is_hf_spec", "kv_cache_off", "read_config", "resolve_folder"]
