"""Generation in the torch verification worker (`--context N --generate G`): the loaded artifact really runs
`model.generate(prompt, max_new_tokens=G, min_new_tokens=G, do_sample=False)` (greedy, the prompt being the
example input of N - G tokens), measured like a forward (planner.measure.library.measure_runs: a first and a
second generate, each from a reset high-water mark, then the latency runs).

- KV cache: the bytes of the storages the returned cache holds (return_dict_in_generate=True), from the first run.
- Timing: a streamer's clock. generate() hands it the prompt, then each new token as it is chosen, so the first
  gap is the prefill (and the first token) and the later ones are the decode steps; reported from the warm run.
- Quality, after the measurement (not counted in any peak): the model reads the float32 reference's sequence
  (prompt and its G greedy tokens) once and its logits at the G positions that chose those tokens are compared
  with the reference's (SQNR, and top-1: the share of those positions where its argmax agrees with float32's, i.e.
  teacher-forced token agreement). Beside them, how many of its own greedy tokens match float32's before the
  first divergence.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from planner.analysis.generation import GenerationSpec
from planner.analysis.kv_cache import cache_tensors, held_bytes
from planner.measure.library import RunMeasurement, compare_outputs, measure_runs


class StepClock:
    """A transformers streamer that only notes when generate() hands it something: the prompt, then each token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        return None

    def prefill_ms(self) -> float | None:
        return (self.times[1] - self.times[0]) * 1000 if len(self.times) >= 2 else None

    def decode_ms_per_token(self) -> float | None:
        gaps = [(later - earlier) * 1000 for earlier, later in zip(self.times[1:], self.times[2:], strict=False)]
        return statistics.median(gaps) if gaps else None


def generate(model: nn.Module, prompt: torch.Tensor, spec: GenerationSpec, clock: StepClock | None = None) -> Any:
    """Greedy generation of exactly G tokens, returning the cache (generate()'s own defaults otherwise)."""
    return model.generate(prompt, max_new_tokens=spec.new_tokens, min_new_tokens=spec.new_tokens, do_sample=False,
                          return_dict_in_generate=True, streamer=clock)


def measure_generation(model: nn.Module, prompt: torch.Tensor, spec: GenerationSpec, sequences_path: Path
                       ) -> tuple[RunMeasurement, dict[str, Any]]:
    """The measured generate() runs, and what they tell beside the peaks: the KV cache bytes and sequence of the
    first run (the sequence is written to `sequences_path`: nothing of it stays in memory), the warm run's
    timing."""
    found: dict[str, Any] = {}
    clocks: list[StepClock] = []

    def run() -> Any:
        clocks.append(StepClock())
        return generate(model, prompt, spec, clocks[-1])

    def keep_first(output: Any) -> None:
        found["verified_kv_cache_bytes"] = held_bytes(cache_tensors(output.cache))
        torch.save(output.sequences, sequences_path)

    measured = measure_runs(run, keep_first)
    warm = clocks[1] if len(clocks) > 1 else clocks[0]
    found["prefill_ms"] = warm.prefill_ms()
    found["decode_ms_per_token"] = warm.decode_ms_per_token()
    measured.latency_ms = found["decode_ms_per_token"] or measured.latency_ms  # the table's latency: per token
    return measured, found


def forced_logits(model: nn.Module, sequences: torch.Tensor, spec: GenerationSpec) -> torch.Tensor:
    """Float32 logits at the G positions that chose the generated tokens of `sequences` (one forward over all but
    the last token, no cache)."""
    inputs = sequences[:, :-1]
    try:
        output = model(input_ids=inputs, use_cache=False, logits_to_keep=spec.new_tokens)
    except TypeError:  # a forward without logits_to_keep: all positions, then the last G
        output = model(input_ids=inputs, use_cache=False)
    logits = output.logits if hasattr(output, "logits") else output[0]
    return logits[:, -spec.new_tokens:].float()


def matching_prefix(sequences: torch.Tensor, reference: torch.Tensor, prompt_tokens: int) -> int:
    """Generated tokens identical to the reference's before the first that differs (the smallest over the batch)."""
    generated, expected = sequences[:, prompt_tokens:], reference[:, prompt_tokens:]
    same = (generated == expected).to(torch.int64).cumprod(dim=-1)
    return int(same.sum(dim=-1).min())


def generation_quality(model: nn.Module, spec: GenerationSpec, sequences: torch.Tensor, reference_path: Path,
                       save_reference: bool) -> dict[str, Any]:
    """Teacher-forced logits on the float32 reference's sequence compared with the reference's (the reference
    worker writes them, with its sequence, to `reference_path`), and the matching greedy prefix."""
    if save_reference:
        logits = forced_logits(model, sequences, spec)
        torch.save({"sequences": sequences, "logits": logits}, reference_path)
        reference = {"sequences": sequences, "logits": logits}
    else:
        reference = torch.load(reference_path, weights_only=True)
        logits = forced_logits(model, reference["sequences"], spec)
    return {**compare_outputs([reference["logits"]], [logits]), "output_shapes": [list(logits.shape)],
            "matching_generated_tokens": matching_prefix(sequences, reference["sequences"], spec.prompt_tokens)}
