"""The verified runtime is a fresh process's lifetime peak (issue 13's measurement definition).

A user checks it the obvious way: a fresh Python process imports torch and torchao, builds the model on the meta
device, loads the exported state dict and runs two forwards; its peak resident memory over the resident memory
before the load must match the plan's verified runtime. The script below is that check, written without planner
code, against a model big enough (about 70 MB) that kernel libraries' pages are not the figure.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from planner.cli.commands import main

MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1024, 8192), nn.GELU(), nn.Linear(8192, 1024))
        return model.eval(), torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
''')

INDEPENDENT = textwrap.dedent('''
    import importlib.util, json, sys
    import torch
    import torchao  # noqa: F401  (the exported int8 tensors are torchao's)

    def status(field):
        with open("/proc/self/status") as lines:
            return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

    spec = importlib.util.spec_from_file_location("user_model", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.device("meta"):
        model, _ = module.build()
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = status("VmRSS")
    model.load_state_dict(torch.load(sys.argv[2], weights_only=True), assign=True)
    with torch.inference_mode():
        model(x)
        model(x)
    print(json.dumps({"peak_bytes": status("VmHWM") - before}))
''')


@pytest.fixture(scope="module")
def exported_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One plan of both recipes (the float32 reference is verified either way), exported."""
    root = tmp_path_factory.mktemp("lifetime")
    (root / "user_model.py").write_text(MODEL)
    (root / "independent.py").write_text(INDEPENDENT)
    # planner.cli's main in this process: the verified figures come from fresh verification workers either way (the
    # planner's own process holds no measurement); only its interpreter start and imports are saved.
    code = main(["plan", f"{root / 'user_model.py'}:build", "--budget", "1GB", "--backend", "torch", "--recipes",
                 "fp32,int8-dynamic", "--out", str(root / "out"), "--export", str(root / "export"), "--export-all"])
    assert code == 0
    return root


@pytest.mark.parametrize("recipe", ["fp32", "int8-dynamic"])
def test_verified_runtime_matches_an_independent_fresh_process(exported_plan: Path, recipe: str) -> None:
    model_file, script = exported_plan / "user_model.py", exported_plan / "independent.py"
    out, export = exported_plan / "out", exported_plan / "export"
    (row,) = [r for r in json.loads((out / "plan.json").read_text())["rows"] if r["recipe"] == recipe]
    manifest = json.loads((export / recipe / "manifest.json").read_text())
    artifact = export / recipe / manifest["file"]
    # Identical fresh processes differ: under int8 dynamic's threads glibc's per-thread arenas moved this model's
    # peak between 34.9 and 43.1 MB over a dozen runs. The verified figure is one such process: it must lie within 5%
    # of the range five independent processes span, or within that range's own width of it where the processes
    # spread wider than 5%.
    peaks = []
    for _ in range(5):
        independent = subprocess.run([sys.executable, str(script), str(model_file), str(artifact)],
                                     capture_output=True, text=True, check=True)
        peaks.append(json.loads(independent.stdout.strip().splitlines()[-1])["peak_bytes"])

    verified = row["verified_runtime_bytes"]
    assert verified == max(row["verified_load_peak_bytes"], row["verified_first_forward_peak_bytes"],
                           row["verified_steady_peak_bytes"])
    spread = max(peaks) - min(peaks)
    assert min(peaks) - max(0.05 * min(peaks), spread) <= verified <= max(peaks) + max(0.05 * max(peaks), spread), \
        (verified, peaks)
    # The analytic figure targets the same lifetime peak: live bytes plus the framework's measured first-use cost,
    # which brings it closer without passing it. What it does not model (the sgemm packing buffers of a first large
    # float32 matmul, about 10 MB here, what glibc keeps cached, int8 dynamic's per-thread buffers) leaves it below:
    # docs/memory-model.md gives the measured gaps.
    first_use = row["analytic_first_use_bytes"]
    assert first_use > 0
    assert abs(verified - row["analytic_runtime_bytes"]) < abs(verified - (row["analytic_runtime_bytes"] - first_use))
    # The first-use cost is itself one process's figure: with three test runs sharing two cores the analytic fp32
    # figure once landed 1.05x over (91.5 against 87.1 MB).
    assert row["analytic_runtime_bytes"] <= 1.08 * verified, (row["analytic_runtime_bytes"], verified)
