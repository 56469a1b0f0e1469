"""LLM generation at a context length (`planner plan MODEL --context N --generate G`), analytic side.

`generate()` on a causal LM runs a prefill of the prompt (N - G tokens) that computes the last position's logits
only (transformers passes `logits_to_keep=1`), then G - 1 decode steps of one token each, every step reading and
growing the KV cache; the last generated token is never fed back, so the cache ends at N - 1 positions. Its peak is
the weights plus the larger of:

- the prefill's liveness peak (its activations and the cache it builds), and
- the last decode step's (the cache at N - 2 positions, the concatenation that grows it to N - 1, the step's
  activations and the previous step's logits, which generate() still holds).

Both are traced weightless (planner.analysis.activations.traced_call) on FakeTensors with the same cache class
generate() builds (DynamicCache from the config), called with the arguments generate() passes. The decode step's
cache is filled by an untraced fake forward of the positions in between; its tensors count as live from the
start of the trace, so the copies torch.cat replaces are subtracted when they die.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from planner.analysis.activations import ActivationReport, fake_state, traced_call
from planner.analysis.kv_cache import cache_tensors, held_bytes
from planner.core.errors import PlannerError

DEFAULT_NEW_TOKENS = 16


@dataclass(frozen=True)
class GenerationSpec:
    """--context N (prompt and generated tokens together: generate()'s max_length) and --generate G."""

    context: int
    new_tokens: int = DEFAULT_NEW_TOKENS

    @property
    def prompt_tokens(self) -> int:
        return self.context - self.new_tokens

    @property
    def cached_tokens(self) -> int:
        """Positions in the KV cache when the last token is produced (that token is never fed back)."""
        return self.context - 1

    def to_json(self) -> dict[str, int]:
        return {"context": self.context, "new_tokens": self.new_tokens}

    @staticmethod
    def from_json(data: dict[str, Any]) -> GenerationSpec:
        return GenerationSpec(int(data["context"]), int(data["new_tokens"]))


def check_spec(spec: GenerationSpec) -> None:
    """The flags alone: G at least 1 and a prompt of at least one token."""
    if spec.new_tokens < 1:
        raise PlannerError(f"--generate {spec.new_tokens}: give the number of tokens to generate, at least 1")
    if spec.context <= spec.new_tokens:
        raise PlannerError(f"--context {spec.context} must exceed --generate {spec.new_tokens} (the prompt is "
                           f"context - generate tokens): raise --context or lower --generate")


def not_a_causal_lm(model: nn.Module) -> str | None:
    """Why `model` cannot be planned for generation, or None for a transformers causal LM with generate()."""
    name = type(model).__name__
    if not callable(getattr(model, "generate", None)) or getattr(model, "config", None) is None:
        return f"it is a {name}, not a transformers language model with generate()"
    if getattr(model.config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model; only decoder-only causal LMs are planned for generation"
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and not can_generate():
        return f"{name} has no language-model head (transformers says it cannot generate); use its *ForCausalLM"
    return None


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's positions allow (max_position_embeddings, GPT-2's n_positions)."""
    text = model.config.get_text_config(decoder=True)
    value = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_generation(model: nn.Module, spec: GenerationSpec, display: str) -> None:
    """Refuse, in one line saying what to do, a model that is not a causal LM or a context it cannot hold."""
    check_spec(spec)
    problem = not_a_causal_lm(model)
    if problem:
        raise PlannerError(f"--context plans generation for causal language models, and {display} cannot: "
                           f"{problem}; drop --context to plan one forward")
    limit = max_positions(model)
    if limit is not None and spec.context > limit:
        raise PlannerError(f"--context {spec.context} exceeds {display}'s max_position_embeddings ({limit}); "
                           f"give --context {limit} or less")


def cache_implementation_note(model: nn.Module) -> str | None:
    """generate() uses the cache named by the model's generation config; the trace models DynamicCache."""
    generation_config = getattr(model, "generation_config", None)
    implementation = getattr(generation_config, "cache_implementation", None)
    if implementation in (None, "dynamic", "hybrid"):  # transformers now builds a DynamicCache for "hybrid" too
        return None
    return (f"the model's generation config asks for cache_implementation={implementation!r}, which the analytic "
            "figures do not model (they trace transformers' DynamicCache); the verified figures are generate()'s")


def step_kwargs(model: nn.Module, input_ids: torch.Tensor, cache: Any, past: int) -> dict[str, Any]:
    """The keyword arguments generate() passes to the forward for these positions (transformers 5: cache=, before:
    past_key_values=; position_ids when the forward takes them; logits_to_keep=1 when it takes it)."""
    parameters = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": True, "return_dict": True,
                              ("cache" if "cache" in parameters else "past_key_values"): cache}
    if "position_ids" in parameters:
        batch, length = input_ids.shape
        kwargs["position_ids"] = torch.arange(past, past + length, device=input_ids.device).expand(batch, length)
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


def new_cache(model: nn.Module) -> Any:
    """The cache generate() builds by default: DynamicCache from the decoder's config."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config.get_text_config(decoder=True))


def _next_token_logits(output: Any) -> torch.Tensor:
    # What generate() keeps of a step: a float32 copy of the last position's logits (then the output is dropped).
    return output.logits[:, -1].to(copy=True, dtype=torch.float32)


@dataclass
class GenerationTrace:
    prefill: ActivationReport  # its peak includes the cache it builds
    decode: ActivationReport | None  # the last decode step (None when G = 1: there is none); includes the cache
    cache_bytes: int  # what the traced cache holds at the end (fake storages: shapes and dtypes only)
    scratch_calls: list[str]

    @property
    def peak_bytes(self) -> int:
        return max(self.prefill.peak_bytes, self.decode.peak_bytes if self.decode else 0)


def trace_generation(model: nn.Module, prompt: torch.Tensor, spec: GenerationSpec,
                     scratch: dict[str, Any] | None = None) -> GenerationTrace:
    """The prefill and the last decode step of generate() on the weightless `model` (meta, possibly quantized),
    each a liveness trace on FakeTensors claiming the CPU. `prompt`: token ids [batch, N - G]."""
    batch = int(prompt.shape[0])
    fake_mode, state, (fake_prompt,) = fake_state(model, (prompt,), "cpu")
    with fake_mode:
        cache = new_cache(model)

    def prefill() -> Any:
        output = torch.func.functional_call(model, state, (), step_kwargs(model, fake_prompt, cache, 0))
        logits = _next_token_logits(output)
        return torch.argmax(logits, dim=-1)

    prefill_report, _ = traced_call(model, prefill, (state, fake_prompt), fake_mode=fake_mode, scratch=scratch)
    calls = list(prefill_report.scratch_calls)
    decode_report = None
    if spec.new_tokens > 1:
        filled = spec.prompt_tokens
        last = spec.cached_tokens - 1  # the position the last decode step feeds
        with torch.inference_mode(), fake_mode:
            if last > filled:  # the decode steps in between, as one untraced chunk
                ids = torch.zeros(batch, last - filled, dtype=prompt.dtype)
                torch.func.functional_call(model, state, (), step_kwargs(model, ids, cache, filled))
            token = torch.zeros(batch, 1, dtype=prompt.dtype)
            carried = torch.empty(batch, model.config.get_text_config(decoder=True).vocab_size,
                                  dtype=torch.float32)  # the previous step's logits, alive during this step

        def decode() -> Any:
            output = torch.func.functional_call(model, state, (), step_kwargs(model, token, cache, last))
            return torch.argmax(_next_token_logits(output), dim=-1)

        decode_report, _ = traced_call(model, decode, (state, token), fake_mode=fake_mode,
                                       live=(cache_tensors(cache), carried), scratch=scratch)
        calls += decode_report.scratch_calls
        del carried
    return GenerationTrace(prefill_report, decode_report, held_bytes(cache_tensors(cache)), calls)
