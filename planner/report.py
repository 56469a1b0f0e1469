"""Reporting: the ranked DataFrame, the terminal table, plan.{csv,md,json,png} and the exported artifact."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from planner.core.errors import PlannerError
from planner.core.safe_io import MAX_PATH_CHARS, path_inside, read_text_capped
from planner.core.units import format_bytes
from planner.recipes.recipe import CONV1D_LINEARIZED_NOTE, Recipe
from planner.runtimes.registry import create

# plan.json row fields; scripts and CI gates read these, so add fields but never rename them.
ROW_FIELDS = [
    "rank", "recipe", "backend", "status", "fits",
    "analytic_disk_bytes", "verified_disk_bytes", "disk_diff",
    "analytic_weight_bytes", "analytic_activation_bytes",
    "analytic_runtime_bytes", "verified_runtime_bytes", "runtime_diff",
    "verified_weight_resident_bytes", "verified_activation_bytes",
    "sqnr_db", "max_abs_error", "top1_agreement", "latency_ms", "touches", "note",
    # runtime terms, each its own column (see terms_frame)
    "analytic_transient_bytes", "analytic_input_bytes", "analytic_output_bytes", "framework_bytes",
    # what --budget-on device adds; None and unmeasured True where it is not measured (ExecuTorch's C++ runtime)
    "device_framework_bytes", "device_framework_unmeasured",
    "eval_score",  # --eval: the user's quality function on the reloaded model (torch rows)
    # the verified runtime is the largest of the first three (each over the fresh process's baseline); the
    # latency runs' peak is beside it; the analytic runtime includes the framework's first-use cost
    "verified_load_peak_bytes", "verified_first_forward_peak_bytes", "verified_steady_peak_bytes",
    "verified_repeat_peak_bytes", "analytic_first_use_bytes",
    # --context (generate() at a context length): the KV cache's own figures, the traced peaks of the prefill and
    # of the last decode step (each with the cache then), the warm run's timing and the greedy tokens that match
    # float32's before the first difference; latency_ms is then decode_ms_per_token
    "analytic_kv_cache_bytes", "verified_kv_cache_bytes", "analytic_prefill_peak_bytes", "analytic_decode_peak_bytes",
    "prefill_ms", "decode_ms_per_token", "matching_generated_tokens",
    # wall seconds of the row's build (recipe applied, saved or lowered) and of its verification (fresh process:
    # load, forwards, timing, quality), jobs waiting for the timing lock included
    "build_s", "verify_s",
]
PLAN_FILES = ("plan.csv", "plan.md", "plan.json", "plan.png", "layers.csv")
MANIFEST = "manifest.json"
# The keys every manifest the planner wrote has: --force replaces an export folder only if it holds one.
MANIFEST_KEYS = {"recipe", "backend", "files", "sha256", "how_to_load"}
NAME_MAX = 255  # bytes in one path component on Linux file systems
LIBRARIES = ("torch", "torchao", "numpy", "pandas", "safetensors", "onnx", "onnxruntime")


def plan_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{key: row.get(key) for key in ROW_FIELDS} for row in rows], columns=ROW_FIELDS)


def layers_frame(footprints: dict[str, Any]) -> pd.DataFrame:
    """Per-layer analytic bytes under every recipe: which layers dominate, and what each recipe touched."""
    frame: pd.DataFrame | None = None
    for recipe, footprint in footprints.items():
        layer_rows = pd.DataFrame([{
            "layer": layer.name, "type": layer.type, "params": layer.params, "fp32_bytes": layer.fp32_bytes,
            f"{recipe}_bytes": layer.recipe_bytes,
            f"{recipe}_quantized": layer.quantized,
            f"{recipe}_note": layer.note,
        } for layer in footprint.layers])
        frame = layer_rows if frame is None else frame.merge(layer_rows, on=["layer", "type", "params", "fp32_bytes"])
    return frame if frame is not None else pd.DataFrame()


def _percent(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.1%}"


def _sqnr(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return "exact" if math.isinf(value) and value > 0 else f"{value:.1f}"


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Readable strings for the terminal and plan.md."""
    def fmt_fits(row: pd.Series) -> str:
        return "yes" if row["fits"] else ("no" if row["status"] in ("verified", "estimated") else "-")

    def latency(value: Any) -> str:
        return "-" if value is None or pd.isna(value) else f"{value:.1f}"

    def top1(value: Any) -> str:
        return "-" if value is None or pd.isna(value) else f"{value:.0%}"

    shown = pd.DataFrame({
        "#": frame["rank"],
        "recipe": frame["recipe"],
        "backend": frame["backend"].map(lambda b: "ort" if b == "onnxruntime" else b),
        "status": frame["status"],
        "fits": frame.apply(fmt_fits, axis=1),
        "disk (analytic)": frame["analytic_disk_bytes"].map(format_bytes),
        "disk (verified)": frame["verified_disk_bytes"].map(format_bytes),
        "Δdisk": frame["disk_diff"].map(_percent),
        "runtime (analytic)": frame["analytic_runtime_bytes"].map(format_bytes),
        "runtime (verified)": frame["verified_runtime_bytes"].map(format_bytes),
        "Δruntime": frame["runtime_diff"].map(_percent),
        "SQNR dB": frame["sqnr_db"].map(_sqnr),
        "top-1": frame["top1_agreement"].map(top1),
        "latency ms": frame["latency_ms"].map(latency),
        "note": frame["note"].fillna(""),
    })
    if frame["analytic_kv_cache_bytes"].notna().any():  # a --context plan: latency is per generated token
        shown = shown.rename(columns={"latency ms": "ms/token"})
    if not (frame["status"] == "verified").any():  # plan --analytic-only: no measured column to show
        shown = shown.drop(columns=["disk (verified)", "Δdisk", "runtime (verified)", "Δruntime", "SQNR dB", "top-1",
                                    "latency ms", "ms/token"], errors="ignore")
    if frame["eval_score"].notna().any():  # only with --eval
        scores = frame["eval_score"].map(lambda value: "-" if pd.isna(value) else f"{value:.4g}")
        shown.insert(len(shown.columns) - 1, "eval", scores)
    return shown


TERM_COLUMNS = {
    "weights": "analytic_weight_bytes", "weights (verified)": "verified_weight_resident_bytes",
    "activation peak": "analytic_activation_bytes", "activations (verified)": "verified_activation_bytes",
    "of which transient": "analytic_transient_bytes", "outputs": "analytic_output_bytes",
    "inputs": "analytic_input_bytes", "framework": "framework_bytes",
}


GENERATION_TERM_COLUMNS = {"KV cache": "analytic_kv_cache_bytes", "KV cache (verified)": "verified_kv_cache_bytes"}


def terms_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The runtime terms behind each row's peak, for the terminal and plan.md: weights, activations (of which
    transient copies such as a dequantized weight), the inputs (held by the caller, not in the runtime
    figure), and the framework's own baseline, measured once per machine; then what --budget-on device counts
    (the model plus what the device holds for the runtime; `+ C++ runtime` where that is not measured)."""
    def device(row: pd.Series) -> Any:
        runtime = row["verified_runtime_bytes"]
        if runtime is None or pd.isna(runtime):
            runtime = row["analytic_runtime_bytes"]
        framework = row.get("device_framework_bytes", row["framework_bytes"])
        if runtime is None or pd.isna(runtime):
            return None
        if framework is None or pd.isna(framework):
            return f"{format_bytes(runtime)} + C++ runtime" if row.get("device_framework_unmeasured") is True \
                else None
        return format_bytes(runtime + framework)

    # a --context plan shows its KV cache (part of the runtime, beside the activations) after the weights
    generation = GENERATION_TERM_COLUMNS if frame["analytic_kv_cache_bytes"].notna().any() else {}
    return pd.DataFrame({
        "recipe": frame["recipe"],
        "backend": frame["backend"].map(lambda b: "ort" if b == "onnxruntime" else b),
        **{label: frame[key].map(format_bytes) for label, key in {**generation, **TERM_COLUMNS}.items()},
        "device total": frame.apply(device, axis=1).map(lambda value: value if isinstance(value, str) else
                                                        format_bytes(value)),
    })


def plain(value: Any) -> Any:
    """A rich Text of VALUE shown as it is: a model path, recipe name, layer name or error message holding "[/"
    is not markup (rich would raise MarkupError after the whole run)."""
    from rich.text import Text

    return Text(str(value))


def _rich_table(frame: pd.DataFrame, title: str, left: tuple[str, ...]) -> Any:
    from rich.table import Table

    table = Table(title=plain(title), show_lines=False)
    for column in frame.columns:
        table.add_column(column, no_wrap=column == "recipe", justify="left" if column in left else "right")
    return table


def print_table(result: Any, console: Any) -> None:
    """The ranked table, notes numbered underneath so the columns stay readable in 120 characters."""
    frame = plan_frame(result.rows)
    shown = display_frame(frame)
    title = (f"{result.model}: budget {format_bytes(result.budget_bytes)} on {result.budget_on}, "
             f"input {' '.join('×'.join(map(str, s)) for s in result.input_shapes)}")
    generation = getattr(result, "generation", None)
    if generation:
        title += (f", generate() to a context of {generation['context']} tokens ({generation['new_tokens']} "
                  "generated)")
    columns = [c for c in shown.columns if c != "note"]
    table = _rich_table(shown[columns], title, ("recipe", "backend", "status", "fits"))
    for _, row in shown.iterrows():
        style = "green" if row["fits"] == "yes" else ("dim" if row["status"] not in ("verified", "estimated")
                                                      else None)
        table.add_row(*[plain(row[c]) for c in columns], style=style)
    console.print(table)
    terms = terms_frame(frame)
    table = _rich_table(terms, "runtime terms (analytic unless marked verified; framework measured once per machine; "
                        "device total = runtime + framework)", ("recipe", "backend"))
    for _, row in terms.iterrows():
        table.add_row(*map(plain, row))
    console.print(table)
    from rich.markup import escape

    if result.input_note:
        console.print(f"  [bold yellow]input[/]: {escape(result.input_note)}", highlight=False)
    for _, row in shown.iterrows():
        if row["note"]:
            console.print(f"  [bold]{escape(row['recipe'])}[/] ({escape(row['backend'])}): {escape(row['note'])}",
                          highlight=False)


def print_estimates(rows: list[dict[str, Any]], verifying: list[bool], title: str, console: Any) -> None:
    """The analytic table printed before anything is verified: the ranked estimates and whether each will be
    verified; the rows a runtime refuses are counted (the final table gives their reasons)."""
    supported = [(row, chosen) for row, chosen in zip(rows, verifying, strict=True) if row["status"] != "unsupported"]
    if supported:
        frame = plan_frame([row for row, _ in supported])
        shown = display_frame(frame)[["#", "recipe", "backend", "fits", "disk (analytic)", "runtime (analytic)"]]
        shown["#"] = range(1, len(shown) + 1)  # the analytic rank among the rows that can run
        shown = shown.assign(**{"device (analytic)": terms_frame(frame)["device total"].values,
                                "verify": ["yes" if chosen else "-" for _, chosen in supported]})
        table = _rich_table(shown, title, ("recipe", "backend", "fits", "verify"))
        for (_, row), (_, chosen) in zip(shown.iterrows(), supported, strict=True):
            table.add_row(*map(plain, row), style=None if chosen else "dim")
        console.print(table)
    refused = len(rows) - len(supported)
    if refused:
        console.print(f"  {refused} row(s) refused by their runtime: the reasons are in the final table",
                      highlight=False)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary file beside the target, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def plan_json(result: Any) -> dict[str, Any]:
    return {
        "model": result.model,
        "budget_bytes": result.budget_bytes,
        "budget_on": result.budget_on,
        "min_sqnr_db": getattr(result, "min_sqnr_db", None),
        "pick": result.pick,
        "pick_backend": result.pick_backend,
        "input_shapes": result.input_shapes,
        "input_note": result.input_note,
        "generation": getattr(result, "generation", None),  # {"context", "new_tokens"} with --context
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": environment(),
        "rows": [{key: _json_value(row.get(key)) for key in ROW_FIELDS} for row in result.rows],
    }


def environment() -> dict[str, Any]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "libraries": versions}


def check_output_path(directory: Path, flag: str) -> None:
    """A path the file system can hold: a 5000-character --out would fail only when the results are written."""
    text = os.fspath(directory)
    too_long = next((part for part in Path(text).parts if len(os.fsencode(part)) > NAME_MAX), None)
    if len(text) > MAX_PATH_CHARS or too_long is not None:
        raise PlannerError(f"{flag} path is too long ({len(text):,} characters"
                           f"{', one name over 255 bytes' if too_long else ''}); give a shorter path")


def _make_directory(directory: Path, flag: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PlannerError(f"cannot write to {flag} directory {directory}: {error.strerror or error}") from error


@contextlib.contextmanager
def directory_lock(directory: Path, flag: str) -> Iterator[None]:
    """Hold an exclusive lock on DIRECTORY for a whole plan, so a second plan on the same --out or --export fails
    at once (naming the first one's pid) instead of silently replacing its results later.

    The lock is fcntl.flock on the directory itself: no lock file to leave behind when a plan is killed, and the
    kernel releases it when the process ends, however it ends."""
    check_output_path(directory, flag)
    _make_directory(directory, flag)
    try:
        handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise PlannerError(f"cannot lock {flag} directory {directory} ({error.strerror or error}); check it is a "
                           "directory you can read") from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(os.fstat(handle).st_ino)
        os.close(handle)
        raise PlannerError(f"{flag} directory {directory} is in use by another plan (pid {holder or 'unknown'}): "
                           f"wait for it to finish, or choose another {flag} directory") from None
    try:
        yield
    finally:
        os.close(handle)


def lock_holder(inode: int, locks_table: str = "/proc/locks") -> int | None:
    """The pid holding a flock on the file with this inode, from the kernel's lock table (None if unknown)."""
    try:
        with open(locks_table) as table:
            for line in table:
                # "1: FLOCK  ADVISORY  WRITE 12345 fd:01:1234567 0 EOF" (a "->" marks a waiter)
                fields = line.split()
                if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
                    continue
                if fields[5].rsplit(":", 1)[-1] == str(inode) and fields[4].isdigit():
                    return int(fields[4])
    except OSError:
        return None
    return None


def is_planner_folder(folder: Path) -> bool:
    """Whether FOLDER is an export folder the planner wrote: a real directory (not a symlink) holding a regular
    manifest.json with the planner's keys. --force replaces nothing else."""
    manifest = folder / MANIFEST
    if folder.is_symlink() or not folder.is_dir() or manifest.is_symlink():
        return False
    try:
        data = json.loads(read_text_capped(manifest, "manifest", 1 << 20))
    except (PlannerError, ValueError):
        return False
    return isinstance(data, dict) and MANIFEST_KEYS <= data.keys()


def check_writable_target(directory: Path, names: tuple[str, ...], force: bool, flag: str,
                          folders: bool = False) -> None:
    """Refuse, before any work, to overwrite existing results unless --force; fail early if unwritable.

    Even with --force only what the planner writes is replaced: a plain file for --out, a folder with the
    planner's manifest for --export (folders=True); never a symlink, never anything outside DIRECTORY."""
    check_output_path(directory, flag)
    existing = [directory / name for name in names if (directory / name).exists() or (directory / name).is_symlink()]
    if existing and not force:
        raise PlannerError(f"{existing[0]} already exists: pass --force to overwrite it, "
                           f"or choose another {flag} directory")
    for path in existing:
        if path.is_symlink():  # checked before path_inside, which would follow it
            raise PlannerError(f"{path} is a symbolic link: the planner replaces only what it wrote, even with "
                               "--force; remove the link or choose another directory")
    for name in names:
        path_inside(directory, name)
    for path in existing:
        if folders and not is_planner_folder(path):
            raise PlannerError(f"{path} was not written by the planner (no planner {MANIFEST}): --force replaces "
                               f"only exported folders; move it away or choose another {flag} directory")
        if not folders and not path.is_file():
            raise PlannerError(f"{path} is not a file the planner wrote: move it away or choose another {flag} "
                               "directory")
    _make_directory(directory, flag)
    try:
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".planner-write-test-")
        probe.close()
    except OSError as error:
        raise PlannerError(f"cannot write to {flag} directory {directory}: {error.strerror or error}") from error


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG,
                errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY}


@contextlib.contextmanager
def writing_to(directory: Path, flag: str, kept: str) -> Iterator[None]:
    """A failed write (a full disk, a read-only or vanished directory) becomes one line saying what was kept."""
    try:
        yield
    except OSError as error:
        if error.errno not in WRITE_ERRORS:
            raise
        raise PlannerError(f"writing to {flag} directory {directory} failed ({error.strerror or error}); "
                           f"{kept}: free space or choose another {flag} directory") from error


def output_files(result: Any) -> list[tuple[str, bytes | str]]:
    """Every file of a plan's --out, named and rendered in memory: (file name, contents)."""
    from planner.recipes.mixed import file_name

    frame = plan_frame(result.rows)
    files: list[tuple[str, bytes | str]] = [
        ("plan.csv", frame.to_csv(index=False)),
        ("plan.md", display_frame(frame).to_markdown(index=False) + "\n\n### Runtime terms\n\n"
         + terms_frame(frame).to_markdown(index=False) + "\n"),
        ("plan.json", json.dumps(plan_json(result), indent=2) + "\n"),
        ("layers.csv", layers_frame(result.footprints).to_csv(index=False)),
    ]
    if any(row.get("status") == "verified" for row in result.rows):  # the chart plots measured quality
        files.append(("plan.png", chart_png(result)))
    # mixed-precision recipes, re-applicable with --recipe-file
    files += [(file_name(row["recipe"]), row["recipe_toml"]) for row in result.rows if row.get("recipe_toml")]
    return files


def write_outputs(result: Any, directory: Path) -> list[Path]:
    """Write every output of the plan into a staging directory beside the targets, then move them in: a
    failure while writing (a full disk) leaves the previous results as they were, never a mix of old and new."""
    files = output_files(result)
    targets = [path_inside(directory, name) for name, _ in files]
    with writing_to(directory, "--out", "the previous results there are unchanged"):
        staging = Path(tempfile.mkdtemp(dir=directory, prefix=".planner-staging-"))
        try:
            for (_, data), target in zip(files, targets, strict=True):
                (staging / target.name).write_bytes(data.encode() if isinstance(data, str) else data)
            for target in targets:
                os.replace(staging / target.name, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return targets


def chart_png(result: Any) -> bytes:
    """Size (the budget's measure) versus SQNR, with the budget as a vertical line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from planner.core.rank import measured_size

    figure, axes = plt.subplots(figsize=(8, 5))
    finite = [r["sqnr_db"] for r in result.rows if r.get("sqnr_db") not in (None,) and math.isfinite(r["sqnr_db"])]
    ceiling = (max(finite) + 10) if finite else 100.0
    several_backends = len({row.get("backend") for row in result.rows}) > 1  # one recipe, a point per runtime
    for row in result.rows:
        size = measured_size(row, result.budget_on)
        if size is None:
            continue
        sqnr = row.get("sqnr_db")
        quality = ceiling if sqnr is not None and math.isinf(sqnr) and sqnr > 0 else sqnr
        if quality is None:
            continue
        axes.scatter(size / 1e6, quality, color="tab:green" if row.get("fits") else "tab:red",
                     marker="s" if "mixed_front" in row else "o")
        label = f"{row['recipe']} ({row['backend']})" if several_backends else row["recipe"]
        axes.annotate(label, (size / 1e6, quality), textcoords="offset points", xytext=(4, 4), fontsize=8)
    _draw_mixed(axes, result.rows, result.budget_on, ceiling)
    axes.axvline(result.budget_bytes / 1e6, color="black", linestyle="--", label="budget")
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel(f"verified {result.budget_on} MB (log)")
    axes.set_ylabel("output SQNR vs fp32, dB (exact drawn at the top)")
    axes.set_title(f"{result.model}: size versus quality")
    axes.legend()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _draw_mixed(axes: Any, rows: list[dict[str, Any]], budget_on: str, ceiling: float) -> None:
    """The predicted trade-off curve of the mixed search (analytic size, predicted SQNR) and the verified
    mixed rows joined along it."""
    from planner.core.rank import measured_size

    mixed = next((row for row in rows if row.get("mixed_front")), None)
    curve = mixed["mixed_front"] if mixed else None
    if curve:
        # The front is the model's own bytes; a device budget also holds the framework (as the rows do).
        offset = (mixed.get("framework_bytes") or 0) if budget_on == "device" else 0
        points = [((size + offset) / 1e6, min(sqnr, ceiling)) for size, sqnr in curve if size > 0]
        step = max(1, len(points) // 400)
        shown = points[::step] + ([points[-1]] if points and (len(points) - 1) % step else [])
        axes.plot([x for x, _ in shown], [y for _, y in shown], color="tab:blue", alpha=0.6, linestyle=":",
                  marker=".", label="mixed: search front (analytic size, predicted SQNR)")
    verified = sorted((size / 1e6, row["sqnr_db"]) for row in rows if "mixed_front" in row
                      and (size := measured_size(row, budget_on)) and row.get("sqnr_db") is not None
                      and math.isfinite(row["sqnr_db"]))
    if len(verified) > 1:
        axes.plot([x for x, _ in verified], [y for _, y in verified], color="tab:blue", label="mixed: verified")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_folder(recipe: str, backend: str) -> str:
    return recipe if backend == "torch" else f"{recipe}-{backend}"


def export_artifacts(result: Any, picks: list[tuple[str, str]], directory: Path, recipe_table: dict[str, Any],
                     source_json: dict[str, Any]) -> list[Path]:
    """Copy each verified (recipe, backend) artifact to DIRECTORY/FOLDER/ with manifest.json. Every folder is
    written in a staging directory first; only when all are complete are they moved into place, so a failure
    (a full disk) leaves the previous export as it was. A folder is replaced only if the planner wrote it."""
    staged: list[tuple[Path, Path]] = []  # (staging, target)
    try:
        with writing_to(directory, "--export", "the previous export there is unchanged"):
            for name, backend in picks:
                artifact = result.artifact(name, backend)
                row = result.row(name, backend)
                if artifact is None or row is None:
                    continue
                target = path_inside(directory, export_folder(name, backend))
                staging = Path(tempfile.mkdtemp(dir=directory, prefix=".planner-staging-"))
                staged.append((staging, target))
                _stage_export(staging, artifact, backend, name, row, result.model, recipe_table, source_json)
        with writing_to(directory, "--export", "folders moved in before the failure are new, the rest unchanged"):
            for staging, target in staged:
                _move_into_place(staging, target, directory)
    finally:
        for staging, _ in staged:
            shutil.rmtree(staging, ignore_errors=True)
    return [target for _, target in staged]


def _stage_export(staging: Path, artifact: Path, backend: str, name: str, row: dict[str, Any], model: str,
                  recipe_table: dict[str, Any], source_json: dict[str, Any]) -> None:
    runtime = create(backend)
    recipe = Recipe.from_json(recipe_table[name])
    files = runtime.export_files(artifact)
    for path in files:
        shutil.copyfile(path, staging / path.name)
    model_file = staging / files[0].name
    manifest = {
        "recipe": recipe_table[name],
        "backend": backend,
        "model": model,
        "source": source_json,
        "file": model_file.name,
        "files": [path.name for path in files],
        "format": runtime.export_format(artifact),
        "sha256": {path.name: sha256(staging / path.name) for path in files},
        "bytes": sum((staging / path.name).stat().st_size for path in files),
        "verification": {key: _json_value(row.get(key)) for key in ROW_FIELDS},
        "environment": environment(),
        "how_to_load": runtime.how_to_load(model_file.name, artifact.suffix, recipe.tensor_modules,
                                           restructured=CONV1D_LINEARIZED_NOTE in str(row.get("note") or "")),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    os.chmod(staging, 0o755)  # mkdtemp makes it 0700; an exported folder is an ordinary folder


def _move_into_place(staging: Path, target: Path, directory: Path) -> None:
    """Rename STAGING to TARGET. An existing TARGET (allowed by --force, checked before planning) is checked
    again now, renamed aside inside DIRECTORY, and only then removed: nothing outside DIRECTORY is touched."""
    if not (target.exists() or target.is_symlink()):
        staging.rename(target)
        return
    if not is_planner_folder(target):  # it changed since the check before planning
        raise PlannerError(f"{target} is not a folder the planner exported (a symlink, or no planner {MANIFEST}); "
                           "it was left as it is: move it away and export again")
    aside = Path(tempfile.mkdtemp(dir=directory, prefix=".planner-old-"))
    old = aside / "old"
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(aside)  # a real directory we created inside DIRECTORY, holding the folder we just moved
