"""The planner as a user runs it: real recipes applied, saved, reloaded in fresh processes, measured."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def planner(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def one_clean_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not _library_noise(line)]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def _library_noise(line: str) -> bool:
    # torchao prints import-time warnings about optional CUDA extensions on CPU-only machines.
    return any(marker in line for marker in ("Failed to load", "register_constant", "Warning", "warn("))


@pytest.fixture(scope="module")
def simplenet_plan(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    root = tmp_path_factory.mktemp("plan")
    out, export = root / "out", root / "export"
    # 50 MB: everything fits, with room for resident-memory noise.
    done = planner("plan", "zoo:simplenet", "--budget", "50MB", "--budget-on", "runtime", "--backend", "torch",
                   "--recipes", "fp32,bf16,int8-dynamic,int8-weight-only,fp8-dynamic,int4-g128,prune50",
                   "--out", str(out), "--export", str(export), "--export-all")
    return done, out, export


def test_plan_writes_a_stable_json(simplenet_plan: tuple) -> None:
    done, out, _ = simplenet_plan
    assert done.returncode == 0, done.stdout + done.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model"] == "zoo:simplenet" and plan["budget_bytes"] == 50_000_000 and plan["budget_on"] == "runtime"
    assert plan["pick"] == "fp32" and plan["pick_backend"] == "torch"  # everything fits; fp32 loses nothing
    rows = {row["recipe"]: row for row in plan["rows"]}
    required = {"recipe", "status", "analytic_disk_bytes", "verified_disk_bytes", "analytic_runtime_bytes",
                "verified_runtime_bytes", "sqnr_db", "latency_ms", "fits", "note"}
    assert all(required <= set(row) for row in rows.values())
    assert rows["fp32"]["sqnr_db"] == "inf"
    assert 30 < rows["bf16"]["sqnr_db"] < 80
    assert 25 < rows["int8-dynamic"]["sqnr_db"] < 70
    for name in ("fp32", "bf16", "int8-dynamic", "int8-weight-only", "prune50"):
        row = rows[name]
        assert row["status"] == "verified", row
        assert row["verified_disk_bytes"] == pytest.approx(row["analytic_disk_bytes"], rel=0.05)
        assert row["latency_ms"] > 0
        assert row["build_s"] > 0 and row["verify_s"] > 0  # where the plan's time went (fp32: the reference's)
    assert rows["fp8-dynamic"].get("build_s") is None  # refused before any build
    assert rows["int8-dynamic"]["verified_disk_bytes"] < 0.5 * rows["fp32"]["verified_disk_bytes"]
    # Rows that cannot run here say why instead of disappearing.
    assert rows["fp8-dynamic"]["status"] == "unsupported" and "CUDA" in rows["fp8-dynamic"]["note"]
    assert rows["int4-g128"]["status"] == "unsupported" and "not divisible by 16" in rows["int4-g128"]["note"]
    assert "loaded dense" in rows["prune50"]["note"]
    assert (out / "plan.png").read_bytes()[:4] == b"\x89PNG"
    assert "| recipe" in (out / "plan.md").read_text() and "Runtime terms" in (out / "plan.md").read_text()
    # Runtime terms, each its own column: a 1×100 input and 1×10 output; int8 weight-only dequantizes fc1's
    # 100×50 weight to float32 inside the matmul; the framework baseline is one figure for the torch stack.
    assert rows["fp32"]["analytic_input_bytes"] == 400 and rows["bf16"]["analytic_input_bytes"] == 200
    assert rows["fp32"]["analytic_output_bytes"] == 40
    assert rows["int8-weight-only"]["analytic_transient_bytes"] >= 100 * 50 * 4
    assert rows["fp32"]["analytic_transient_bytes"] == 0
    assert len({row["framework_bytes"] for row in rows.values()}) == 1 and rows["fp32"]["framework_bytes"] > 100e6
    assert "analytic_disk_bytes" in (out / "plan.csv").read_text().splitlines()[0]


def test_exported_artifact_loads_without_the_planner(simplenet_plan: tuple) -> None:
    done, out, export = simplenet_plan
    manifest = json.loads((export / "int8-dynamic" / "manifest.json").read_text())
    model_file = export / "int8-dynamic" / manifest["file"]
    import hashlib

    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == manifest["sha256"][manifest["file"]]
    assert manifest["verification"]["status"] == "verified"
    import torchao  # noqa: F401

    from planner.models.zoo import SimpleNet

    model = SimpleNet()
    model.load_state_dict(torch.load(model_file, weights_only=True), assign=True)
    assert type(model.fc1.weight).__name__ == "Int8Tensor"
    assert model(torch.randn(2, 100)).shape == (2, 10)

    from planner.artifact import load_artifact

    int4 = load_artifact(export / "bf16")
    assert int4.fc1.weight.dtype == torch.bfloat16
    assert not any(t.device.type == "meta" for t in int4.state_dict().values())


def test_existing_results_are_not_overwritten(simplenet_plan: tuple) -> None:
    _, out, export = simplenet_plan
    before = (out / "plan.json").read_bytes()
    done = planner("plan", "zoo:simplenet", "--budget", "5MB", "--backend", "torch", "--recipes", "fp32", "--out",
                   str(out))
    assert done.returncode == 2
    assert "--force" in one_clean_line(done.stderr)
    assert (out / "plan.json").read_bytes() == before
    done = planner("plan", "zoo:simplenet", "--budget", "5MB", "--backend", "torch", "--recipes", "fp32", "--export",
                   str(export))
    assert done.returncode == 2 and "--force" in one_clean_line(done.stderr)


def test_transformer_on_both_backends(tmp_path: Path) -> None:
    out, export = tmp_path / "out", tmp_path / "export"
    done = planner("plan", "zoo:tinylm", "--budget", "1GB", "--recipes", "fp32,int8-dynamic,int4-g128",
                   "--backend", "torch,onnxruntime", "--out", str(out), "--export", str(export), "--export-all")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {(row["recipe"], row["backend"]): row for row in json.loads((out / "plan.json").read_text())["rows"]}
    assert len(rows) == 6
    for row in rows.values():
        assert row["status"] == "verified", row
        assert row["verified_disk_bytes"] == pytest.approx(row["analytic_disk_bytes"], rel=0.03)
    torch_rows = {name: row for (name, backend), row in rows.items() if backend == "torch"}
    # Embeddings and attention in_proj stay float, so int4 cannot reach 1/8 of fp32; it must beat int8 though.
    assert torch_rows["int4-g128"]["verified_disk_bytes"] < torch_rows["int8-dynamic"]["verified_disk_bytes"]
    assert torch_rows["int4-g128"]["sqnr_db"] > 5 and math.isfinite(torch_rows["int4-g128"]["sqnr_db"])
    ort_int4 = rows[("int4-g128", "onnxruntime")]
    assert ort_int4["verified_disk_bytes"] < 0.5 * rows[("fp32", "onnxruntime")]["verified_disk_bytes"]

    # The exported ONNX artifact runs in a plain ONNX Runtime session, with no planner code, and its error
    # against the float32 torch model is the one the plan reported.
    import numpy as np
    import onnxruntime

    from planner.models.zoo import ZOO

    manifest = json.loads((export / "int4-g128-onnxruntime" / "manifest.json").read_text())
    session = onnxruntime.InferenceSession(str(export / "int4-g128-onnxruntime" / manifest["file"]))
    ids = ZOO["tinylm"].example_input(1)[0]
    (logits,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    torch.manual_seed(0)
    reference = _reference_logits(ids)
    noise = float(((reference - logits) ** 2).sum())
    sqnr = 10 * np.log10(float((reference**2).sum()) / noise)
    assert sqnr == pytest.approx(ort_int4["sqnr_db"], abs=0.5)


def _reference_logits(ids: torch.Tensor):
    from planner.models.sources import resolve_source

    model = resolve_source("zoo:tinylm").build("cpu")
    with torch.inference_mode():
        return model(ids).numpy().astype("float64")


def test_nothing_fits_exits_1_and_names_the_closest(tmp_path: Path) -> None:
    # One backend: which runtimes the rows are on is not the claim (the default set would verify each recipe on every
    # installed runtime); the model's own runtime figure is what 1 kB cannot hold.
    done = planner("plan", "zoo:simplenet", "--budget", "1kB", "--budget-on", "runtime", "--backend", "torch",
                   "--recipes", "fp32,int8-dynamic")
    assert done.returncode == 1
    assert "nothing fits" in done.stdout and "closest" in done.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["plan", "missing.pt2", "--budget", "512MB"], "missing.pt2"),
        (["plan", "zoo:simplenet", "--budget", "12XB"], "12XB"),
        (["plan", "zoo:simplenet", "--budget", "-5MB"], "-5MB"),
        (["plan", "zoo:simplenet", "--budget", "5MB", "--input-shape", "1,3,32,32"], "fc1"),
        (["plan", "zoo:simplenet", "--budget", "5MB", "--recipes", "int8-dynamc"], "did you mean"),
        (["plan", "zoo:simplenett", "--budget", "5MB"], "simplenet"),
        (["plan", "zoo:simplenet"], "--budget"),
        (["plan", "zoo:simplenet", "--budget", "5MB", "--analytic-only", "--export", "x"], "--export"),
        (["plan", "zoo:simplenet", "--budget", "5MB", "--verify", "some"], "--verify 'some': use needed or all"),
        (["plan", "zoo:simplenet", "--budget", "5MB", "--verify", "all", "--analytic-only"], "verifies nothing"),
        (["plan", "zoo:simplenet", "--budget", "5MB", "--jobs", "0"], "--jobs 0: give how many rows"),
        (["plan", "zoo:simplenet", "--budget", "5MB", "--jobs", "two"], "--jobs"),
        (["plan", "zoo:simplenet", "--budget", "5MB", "--executor", "spark"], "--executor 'spark': use local or ray"),
        (["plan", "zoo:simplenet", "--budget", "5MB", "--ray-address", "10.0.0.1:6379"], "add --executor ray"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], expected: str) -> None:
    done = planner(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in one_clean_line(done.stderr)


def test_analytic_only_plan_ranks_estimates_and_agrees_with_the_verified_plan(
        simplenet_plan: tuple, tmp_path: Path) -> None:
    """--analytic-only materializes and verifies nothing, yet its figures are the verified plan's analytic ones."""
    out = tmp_path / "analytic"
    # 60 MB of runtime: SimpleNet's runtime is its first forward's framework costs (5-20 MB, more in a freshly
    # installed venv) and a few kB of its own.
    done = planner("plan", "zoo:simplenet", "--budget", "60MB", "--budget-on", "runtime", "--analytic-only",
                   "--recipes",
                   "fp32,bf16,int8-dynamic,int8-weight-only,fp8-dynamic,int4-g128,prune50", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "estimated, not verified" in done.stdout
    rows = {row["recipe"]: row for row in json.loads((out / "plan.json").read_text())["rows"]}
    verified = {row["recipe"]: row for row in json.loads((simplenet_plan[1] / "plan.json").read_text())["rows"]}
    assert rows["fp8-dynamic"]["status"] == "unsupported"  # CUDA-only: still a row with the reason
    for name, row in rows.items():
        assert row["verified_runtime_bytes"] is None and row["sqnr_db"] is None and not row.get("artifact")
        assert row["analytic_runtime_bytes"] == verified[name]["analytic_runtime_bytes"], name
        # The same rows are unsupported, for the same reason, as in the verified plan.
        expected = "unsupported" if verified[name]["status"] == "unsupported" else "estimated"
        assert row["status"] == expected and row["fits"] == (expected == "estimated"), name
    # Nothing measured quality: the least compressed fitting recipe ranks first.
    assert json.loads((out / "plan.json").read_text())["pick"] == "fp32"
    assert not (out / "plan.png").exists()
