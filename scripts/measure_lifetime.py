"""An independent check of a verified runtime: the peak resident memory of load + two forwards.

    python scripts/measure_lifetime.py EXPORTED_FOLDER [--inputs INPUTS.pt] [--json OUT.json]

Run it as a fresh process. It imports torch and torchao (the int4 prototype's tensor types included) and the
model's own code (it builds the weightless structure the manifest's `how_to_load` needs, and the example input),
reads VmRSS as its baseline, then loads the artifact as the exported manifest says, runs the example input twice
under inference_mode and reads VmHWM: lifetime = VmHWM - baseline. It never resets the high-water mark and does
no warm-up, so nothing the planner's worker does (planner.verify) shapes the figure. The cumulative VmHWM is also
read after the load and after the first forward, and the baseline right after the torch/torchao imports, so a
difference can be located. ONNX folders are loaded with onnxruntime.InferenceSession instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def snapshot() -> dict[str, int]:
    return {name: status_bytes(name) for name in ("VmRSS", "VmHWM", "RssFile", "RssAnon")}


def measure(folder: Path, inputs_path: Path | None) -> dict[str, Any]:
    manifest = json.loads((folder / "manifest.json").read_text())
    model_file = folder / manifest["file"]
    recipe = manifest.get("recipe") or {}
    if manifest["format"] == "onnx":
        return _measure_onnx(model_file, inputs_path or _default_inputs(manifest))
    import torch

    from planner.recipes import DTYPES, import_tensor_types

    import_tensor_types()  # torchao and its prototype int4 tensor types: needed to unpickle the artifact
    after_imports = snapshot()
    structure = None
    if manifest["format"] == "state_dict":
        from planner.artifact import weightless_structure
        from planner.recipes import Recipe, linearize_conv1d
        from planner.sources import ModelSource

        structure = weightless_structure(ModelSource.from_json(manifest["source"]), "state_dict")
        if recipe:
            linearize_conv1d(structure, Recipe.from_json(recipe))
    inputs = tuple(torch.load(inputs_path, weights_only=True)) if inputs_path else _default_inputs(manifest)
    dtype = DTYPES[recipe.get("dtype", "float32")]
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    baseline = snapshot()

    if manifest["format"] == "torchscript":
        model = torch.jit.load(str(model_file), map_location="cpu")
    else:
        from planner.artifact import load_weights_into, set_eval
        from planner.pruning import unpack_artifact_state

        assert structure is not None
        model = set_eval(load_weights_into(structure, unpack_artifact_state(
            structure, torch.load(model_file, weights_only=True))))
    after_load = snapshot()
    with torch.inference_mode():
        model(*inputs)
        after_first = snapshot()
        model(*inputs)
    after_second = snapshot()
    return _figures(after_imports, baseline, after_load, after_first, after_second)


def _default_inputs(manifest: dict[str, Any]) -> tuple[Any, ...]:
    from planner.sources import ModelSource

    return tuple(ModelSource.from_json(manifest["source"]).example_inputs())


def _measure_onnx(model_file: Path, inputs: Path | tuple[Any, ...]) -> dict[str, Any]:
    import numpy as np
    import onnxruntime

    arrays = ([t.numpy() for t in inputs] if isinstance(inputs, tuple)
              else _torch_free_inputs(inputs))
    after_imports = snapshot()
    baseline = snapshot()
    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    after_load = snapshot()
    feeds = {meta.name: np.asarray(value) for meta, value in zip(session.get_inputs(), arrays, strict=True)}
    session.run(None, feeds)
    after_first = snapshot()
    session.run(None, feeds)
    after_second = snapshot()
    return _figures(after_imports, baseline, after_load, after_first, after_second)


def _torch_free_inputs(path: Path) -> list[Any]:
    import torch  # before the baseline, as planner.onnx_verify does for a .pt input file

    return [t.numpy() for t in torch.load(path, weights_only=True)]


def _figures(after_imports: dict[str, int], baseline: dict[str, int], after_load: dict[str, int],
             after_first: dict[str, int], after_second: dict[str, int]) -> dict[str, Any]:
    base = baseline["VmRSS"]
    return {
        "baseline_after_imports_bytes": after_imports["VmRSS"],
        "baseline_bytes": base,
        "load_peak_bytes": after_load["VmHWM"] - base,
        "through_first_forward_peak_bytes": after_first["VmHWM"] - base,
        "lifetime_peak_bytes": after_second["VmHWM"] - base,
        "resident_after_load_bytes": after_load["VmRSS"] - base,
        "file_backed_growth_bytes": after_second["RssFile"] - baseline["RssFile"],
        "snapshots": {"after_imports": after_imports, "baseline": baseline, "after_load": after_load,
                      "after_first": after_first, "after_second": after_second},
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an exported folder (planner plan --export) with manifest.json")
    parser.add_argument("--inputs", type=Path, help="a torch.save'd tuple of example inputs (default: the "
                                                    "source's own example input)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    figures = measure(args.folder, args.inputs)
    text = json.dumps(figures, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
