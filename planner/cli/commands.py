"""Command line: thin commands over the pipeline. Bad input is one line on stderr and exit 2."""

from __future__ import annotations

import contextlib
import errno
import math
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer 0.29 vendors click
from typer.exceptions import Abort, Exit

from planner import quiet_library_noise
from planner.core.errors import NothingFits, PlannerError
from planner.core.safe_io import check_regular_file

if TYPE_CHECKING:
    from planner.analysis.generation import GenerationSpec
    from planner.plan.executors import ExecutorOptions
    from planner.plan.pipeline import PlanResult
    from planner.recipes.recipe import Recipe
    from planner.runtimes.rows import PlanOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Which compression recipe fits your device? Measured, not guessed.")
# Piped output gets a wide table rather than rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True, soft_wrap=True)


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help="zoo:NAME, file.py:factory, package.module:factory, "
                                              "model.pt2, a TorchScript file, or a torch.save'd model.pt")],
    budget: Annotated[str, typer.Option(help="device limit, e.g. 512MB, 2GiB (kB/MB/GB = 1000^n, "
                                             "KiB/MiB/GiB = 1024^n)")],
    budget_on: Annotated[str, typer.Option(help="what the budget limits: device (the default: the model's peak "
                                                "memory plus what the device holds for the runtime itself: the "
                                                "Python process for torch and onnxruntime, measured once per "
                                                "machine), runtime (the model's peak memory alone) or disk "
                                                "(the artifact)")]
    = "device",
    backend: Annotated[str | None, typer.Option(help="comma-separated runtimes to verify on: torch, onnxruntime "
                                                     "(default: both where onnxruntime is installed)")] = None,
    recipes: Annotated[str | None, typer.Option(help="comma-separated recipe names (see `planner recipes`)")]
    = None,
    recipe_file: Annotated[Path | None, typer.Option(help="a TOML file of [[recipe]] tables")] = None,
    input_shape: Annotated[str | None, typer.Option(help="example input shape, e.g. 1,3,256,256")] = None,
    input_dtype: Annotated[str | None, typer.Option(help="example input dtype, e.g. float32, int64")] = None,
    batch_size: Annotated[int | None, typer.Option(help="override the batch dimension of the input")] = None,
    weights: Annotated[str | None, typer.Option(help="state dict for a factory: .safetensors or .pt")] = None,
    trust_code: Annotated[bool, typer.Option(help="allow the model file to run code: a pickle needing other "
                                                  "classes, TorchScript, a .pt2 with pickled parts (only for "
                                                  "files you trust)")] = False,
    trust_pickle: Annotated[bool, typer.Option(hidden=True, help="old name of --trust-code")] = False,
    out: Annotated[Path | None, typer.Option(help="write plan.csv, plan.md, plan.json, plan.png here")] = None,
    export: Annotated[Path | None, typer.Option(help="write the picked artifact and its manifest here")] = None,
    export_all: Annotated[bool, typer.Option(help="with --export: every verified artifact")] = False,
    force: Annotated[bool, typer.Option(help="overwrite existing results or artifacts")] = False,
    timeout: Annotated[float, typer.Option(help="seconds allowed to verify one recipe")] = 900.0,
    memory_cap: Annotated[str | None, typer.Option(help="resident memory one verification may use, e.g. 8GB "
                                                        "(default: 90% of the memory available at start)")] = None,
    mixed: Annotated[bool, typer.Option(help="add a mixed:<budget> row: a precision per layer chosen from "
                                             "measured sensitivities, verified like the others")] = False,
    mixed_budgets: Annotated[str | None, typer.Option(help="more budgets for mixed rows (the trade-off curve), "
                                                           "e.g. 300MB,400MB; implies --mixed")] = None,
    calibration: Annotated[Path | None, typer.Option(help="real inputs for the mixed sensitivity pass: .pt "
                                                          "(tensor or tuple) or .safetensors")] = None,
    mixed_dtype: Annotated[str, typer.Option(help="mixed recipes' float layers and activations: float32, bfloat16 "
                                                  "(faster int4 on CPU, smaller float layers) or auto (search both, "
                                                  "keep the better prediction per budget)")] = "auto",
    eval_fn: Annotated[str | None, typer.Option("--eval", help="your quality function, module:fn or file.py:fn: "
                                                          "fn(model) -> float, higher is better; run on every "
                                                          "verified torch row")] = None,
    analytic_only: Annotated[bool, typer.Option(help="rank the analytic estimates alone: no weights are "
                                                     "materialized and nothing is verified (models too big to "
                                                     "verify here; the torch backend)")] = False,
    min_sqnr: Annotated[float | None, typer.Option(help="the least output SQNR in dB against fp32 the pick may "
                                                        "have (e.g. 20); rows below it are kept but never picked")]
    = None,
    verify: Annotated[str, typer.Option(help="which rows to verify: needed (the default: those whose analytic "
                                             "figure could fit the budget, and the float32 reference) or all")]
    = "needed",
    jobs: Annotated[int | None, typer.Option(help="rows verified at once, each job's predicted memory summed under "
                                                  "--memory-cap (default: 1 below 4 cores, else half the cores, at "
                                                  "most 4); their forwards and timed runs still run alone")] = None,
    executor: Annotated[str, typer.Option(help="where rows are verified: local (this machine) or ray (Ray tasks on "
                                               "the cluster of --ray-address or RAY_ADDRESS, else a private local "
                                               "instance; pip install 'planner[ray]')")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="the Ray cluster of --executor ray, e.g. 10.0.0.1:6379 "
                                                         "(default: RAY_ADDRESS)")] = None,
    context: Annotated[int | None, typer.Option(help="plan LLM generation for a causal LM: generate() to this many "
                                                     "tokens in all (prompt + generated, its max_length); the "
                                                     "runtime is its peak with the KV cache, verified by really "
                                                     "generating")] = None,
    generate: Annotated[int | None, typer.Option(help="with --context: tokens generated greedily after a prompt of "
                                                      "context - generate tokens (default 16)")] = None,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """Enumerate recipes, estimate each, verify for real each that could fit, rank them against the budget."""
    from planner.core.units import parse_size
    from planner.recipes.recipe import default_recipes, load_recipe_file, select_recipes

    budget_bytes = parse_size(budget)
    memory_cap_bytes = parse_size(memory_cap) if memory_cap is not None else None
    if budget_on not in ("runtime", "disk", "device"):
        raise PlannerError(f"--budget-on {budget_on!r}: use runtime, disk or device")
    check_limits(timeout, memory_cap)
    if min_sqnr is not None and not math.isfinite(min_sqnr):
        raise PlannerError(f"--min-sqnr {min_sqnr}: give a number of dB, e.g. 20")
    backends = parse_backends(backend)
    from planner.plan.executors import ExecutorOptions, check_executor

    executor_options = ExecutorOptions(executor, jobs, ray_address)
    check_executor(executor_options)
    from planner.core.rank import VERIFY_MODES

    if verify not in VERIFY_MODES:
        raise PlannerError(f"--verify {verify!r}: use {' or '.join(VERIFY_MODES)}")
    if analytic_only and verify == "all":
        raise PlannerError("--analytic-only verifies nothing: drop --verify all, or --analytic-only")
    generation = generation_spec(context, generate, input_shape, input_dtype, mixed or bool(mixed_budgets))
    if generation is not None:  # the example input is the prompt: token ids, context - generate of them
        input_shape, input_dtype = f"1,{generation.prompt_tokens}", "int64"
    if analytic_only:
        _check_analytic_only(backend, mixed or bool(mixed_budgets), export, eval_fn, min_sqnr)
        backends = ("torch",)
    from planner.plan.mixed_plan import parse_budgets

    mixed_texts = parse_budgets(budget, mixed_budgets) if mixed or mixed_budgets else ()
    if calibration is not None and not mixed_texts:
        raise PlannerError("--calibration is used by the mixed-precision search: add --mixed")
    if calibration is not None:  # a FIFO would hang the plan, a device read forever
        check_regular_file(calibration, "--calibration")
    if mixed_dtype not in ("auto", "float32", "bfloat16"):
        raise PlannerError(f"--mixed-dtype {mixed_dtype!r}: use auto, float32 or bfloat16")
    available = load_recipe_file(recipe_file) if recipe_file else default_recipes()
    chosen = select_recipes(available, recipes)
    from planner import report
    from planner.plan.mixed_plan import mixed_name
    from planner.recipes.mixed import file_name

    with contextlib.ExitStack() as locks:
        # Lock --out and --export before any check or work, for the whole plan (one lock if they are the same).
        for directory, flag in _output_directories(out, export):
            locks.enter_context(report.directory_lock(directory, flag))
        if out:
            mixed_files = tuple(file_name(mixed_name(text)) for text in mixed_texts)
            report.check_writable_target(out, report.PLAN_FILES + mixed_files, force, "--out")
        if export:
            names = [r.name for r in chosen] + [mixed_name(text) for text in mixed_texts]
            folders = tuple(report.export_folder(name, b) for name in names for b in backends)
            report.check_writable_target(export, folders, force, "--export", folders=True)
        _plan_locked(model, chosen, backends, mixed_texts, budget_bytes, memory_cap_bytes, budget_on=budget_on,
                     timeout=timeout, weights=weights, trust_code=trust_code or trust_pickle, input_shape=input_shape,
                     input_dtype=input_dtype, batch_size=batch_size, calibration=calibration, export_all=export_all,
                     mixed_dtype=mixed_dtype, analytic_only=analytic_only, eval_fn=eval_fn, out=out, export=export,
                     min_sqnr=min_sqnr, verify=verify, executor=executor_options, generation=generation)


def generation_spec(context: int | None, generate: int | None, input_shape: str | None, input_dtype: str | None,
                    mixed: bool) -> GenerationSpec | None:
    """--context and --generate as a GenerationSpec (None without --context), refusing what cannot go with them.
    Whether the model is a causal LM that holds the context is checked once it is loaded (run_plan)."""
    from planner.analysis.generation import DEFAULT_NEW_TOKENS, GenerationSpec, check_spec

    if context is None:
        if generate is not None:
            raise PlannerError("--generate counts the tokens generated at a --context: add --context N")
        return None
    if input_shape is not None or input_dtype is not None:
        raise PlannerError("--context makes the example input a prompt of context - generate token ids: drop "
                           "--input-shape and --input-dtype (--batch-size still sets the number of prompts)")
    if mixed:
        raise PlannerError("--mixed searches per-layer precisions on one forward, not on generation: drop --mixed "
                           "or --context")
    spec = GenerationSpec(context, DEFAULT_NEW_TOKENS if generate is None else generate)
    check_spec(spec)
    return spec


def _output_directories(out: Path | None, export: Path | None) -> list[tuple[Path, str]]:
    """--out and --export, each once: two locks on one directory from one process would block each other."""
    from planner import report

    given = [(path, flag) for path, flag in ((out, "--out"), (export, "--export")) if path is not None]
    for path, flag in given:
        report.check_output_path(path, flag)
    if len(given) == 2 and given[0][0].resolve() == given[1][0].resolve():
        return given[:1]
    return given


def _plan_locked(model: str, chosen: list[Recipe], backends: tuple[str, ...], mixed_texts: tuple[str, ...],
                 budget_bytes: int, memory_cap_bytes: int | None, *, budget_on: str, timeout: float,
                 weights: str | None, trust_code: bool, input_shape: str | None, input_dtype: str | None,
                 batch_size: int | None, calibration: Path | None, export_all: bool, mixed_dtype: str,
                 analytic_only: bool, eval_fn: str | None, out: Path | None, export: Path | None,
                 min_sqnr: float | None = None, verify: str = "needed", executor: ExecutorOptions | None = None,
                 generation: GenerationSpec | None = None) -> None:
    """The plan itself, run while --out and --export are locked."""
    from planner import report
    from planner.measure.isolation import report_stage
    from planner.models.sources import resolve_source
    from planner.plan.pipeline import PlanOptions, run_plan

    report_stage("loading the model")  # the model's code (a factory) runs from here on
    source = resolve_source(model, weights=weights, trust_code=trust_code, input_shape=input_shape,
                            input_dtype=input_dtype, batch_size=batch_size, weightless=analytic_only)
    if calibration is not None:  # checked before any work, against the model's example input
        from planner.analysis.sensitivity import load_calibration

        load_calibration(calibration, source.example_inputs())
    options = PlanOptions(budget_bytes=budget_bytes, budget_on=budget_on, timeout_s=timeout,
                          keep_all_artifacts=export_all, backends=backends, mixed_budgets=mixed_texts,
                          calibration=str(calibration) if calibration else None, mixed_dtype=mixed_dtype,
                          analytic_only=analytic_only, min_sqnr_db=min_sqnr, verify=verify, generation=generation)
    if eval_fn:
        from planner.analysis.evalhook import resolve_eval_spec

        report_stage("importing --eval")
        options.eval_spec = resolve_eval_spec(eval_fn)
    if memory_cap_bytes is not None:  # else the default: what the machine can give now
        options.memory_cap_bytes = memory_cap_bytes
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # markup=False: a description can hold a model path or layer name, which is not rich markup.
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("planning", total=None)
        result = run_plan(source, chosen, options, progress=lambda message, done, total: bar.update(
            task, description=message, completed=done, total=total),
            on_estimates=lambda rows: _print_estimates(rows, options, source.spec), executor=executor)
    report_stage("writing the results")
    try:
        # Written before anything is printed: the results are on disk whatever the terminal does.
        written = report.write_outputs(result, out) if out else []
        report.print_table(result, console)
        for path in written:
            console.print(f"wrote {path}", markup=False, highlight=False)
        _announce(result, console)
        if export:
            exported = ([(r["recipe"], r["backend"]) for r in result.rows if r.get("status") == "verified"]
                        if export_all else [(result.pick, result.pick_backend)] if result.pick else [])
            recipe_table = {r.name: r.to_json() for r in chosen}
            recipe_table.update({r["recipe"]: r["recipe_json"] for r in result.rows if "recipe_json" in r})
            for path in report.export_artifacts(result, exported, export, recipe_table, source.to_json()):
                console.print(f"exported {path}", markup=False, highlight=False)
    finally:
        result.cleanup()
    if result.pick is None:
        raise NothingFits()


def _print_estimates(rows: list[dict[str, Any]], options: PlanOptions, model: str) -> None:
    """The analytic table, before verification starts (an --analytic-only plan prints its table at the end)."""
    if options.analytic_only:
        return
    from planner import report
    from planner.core.units import format_bytes
    from planner.plan.pipeline import needs_verifying

    verifying = [needs_verifying(row, options) for row in rows]
    count = sum(verifying)
    how = ("every supported row (--verify all)" if options.verify == "all" else
           "the rows whose analytic figure could fit, and the float32 reference")
    report.print_estimates(rows, verifying, f"{model}: analytic estimates against {format_bytes(options.budget_bytes)}"
                           f" on {options.budget_on}; verifying {count} of {len(rows)}: {how}", console)


def check_limits(timeout: float, memory_cap: str | None) -> None:
    """--timeout and --memory-cap, which the supervisor (planner.cli.supervisor) also applies to this process."""

    from planner.core.units import parse_size

    if not math.isfinite(timeout) or timeout <= 0:  # NaN compares false to everything: it would mean "never"
        raise PlannerError(f"--timeout {timeout}: give a positive number of seconds, e.g. 900")
    if memory_cap is not None and parse_size(memory_cap) <= 0:
        raise PlannerError(f"--memory-cap {memory_cap}: give a positive size, e.g. 8GB")


def _check_analytic_only(backend: str | None, mixed: bool, export: Path | None, eval_fn: str | None,
                         min_sqnr: float | None = None) -> None:
    """--analytic-only measures nothing, so options that need a measurement or an artifact are refused."""
    other_backends = backend is not None and any(name.strip() not in ("", "torch") for name in backend.split(","))
    needs = [flag for flag, given in ((f"--backend {backend}", other_backends),
                                      ("--mixed", mixed), ("--export", export is not None),
                                      ("--eval", eval_fn is not None), ("--min-sqnr", min_sqnr is not None))
             if given]
    if needs:
        raise PlannerError(f"--analytic-only verifies nothing, so {', '.join(needs)} cannot be used with it: "
                           "drop --analytic-only to verify, or drop those options")


def parse_backends(text: str | None) -> tuple[str, ...]:
    """--backend: registered runtimes (torch, onnxruntime); by default each whose package is installed."""
    from planner.runtimes.registry import OPTIONAL_PACKAGES, RUNTIMES, available

    if text is None:
        return tuple(name for name in RUNTIMES if available(name))
    chosen = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in chosen if name not in RUNTIMES]
    if unknown or not chosen:
        raise PlannerError(f"--backend {text!r}: use {', '.join(RUNTIMES)} or {','.join(RUNTIMES)}")
    missing = next((name for name in chosen if not available(name)), None)
    if missing is not None:
        package = OPTIONAL_PACKAGES[missing]
        raise PlannerError(f"--backend {missing}: {package} is not installed (pip install {package})")
    return chosen


def _announce(result: PlanResult, console: Console) -> None:
    from rich.markup import escape

    from planner.core import rank
    from planner.core.units import format_bytes

    budget = format_bytes(result.budget_bytes)

    def named(row: dict[str, Any]) -> str:  # recipe and backend, as text, not markup
        return f"{escape(row['recipe'])} on {escape(row['backend'])}"

    if result.pick:
        row = result.row(result.pick, result.pick_backend or "torch")
        assert row is not None
        size = format_bytes(rank.measured_size(row, result.budget_on))
        if row["status"] == "estimated":
            console.print(f"[bold yellow]pick (estimated, not verified): {named(row)}[/] "
                          f"({result.budget_on} {size} analytic, budget {budget}): the least compressed recipe "
                          "that fits; quality was not measured, so verify it (drop --analytic-only) before "
                          "relying on it")
            return
        console.print(f"[bold green]pick: {named(row)}[/] ({result.budget_on} {size} "
                      f"verified, budget {budget})")
        warning = rank.low_quality_warning(row)
        if warning:
            console.print(f"[bold yellow]warning:[/] {escape(warning)}")
        return
    floor = result.min_sqnr_db
    below = [row for row in result.rows if row.get("fits") and not rank.meets_quality(row, floor)]
    if floor is not None and below:
        best = max(below, key=rank.quality)
        console.print(f"[bold red]nothing fits {budget} with SQNR ≥ {floor:g} dB[/]: {len(below)} row(s) fit the "
                      f"budget below it, the best {named(best)} at {rank.quality(best):.1f} dB; lower --min-sqnr "
                      "or raise the budget")
        return
    near = rank.closest(result.rows, result.budget_on)
    if near is None:
        console.print("[bold red]no recipe verified on this machine[/]")
    else:
        size = format_bytes(rank.measured_size(near, result.budget_on))
        how = "estimated" if near["status"] == "estimated" else "verified"
        console.print(f"[bold red]nothing fits {budget}[/]: the closest is {named(near)} "
                      f"at {size} {how} {result.budget_on}")


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="the same model sources as `planner plan`")],
    recipes: Annotated[str | None, typer.Option(help="comma-separated recipes whose per-layer bytes to show "
                                                     "(default fp32,bf16,int8-dynamic,int4-g128; fp32 in train mode)")]
    = None,
    batch_size: Annotated[str | None, typer.Option(help="one batch size or several to sweep, e.g. 1,8,64")] = None,
    input_shape: Annotated[str | None, typer.Option(help="example input shape, e.g. 1,3,256,256")] = None,
    input_dtype: Annotated[str | None, typer.Option(help="example input dtype, e.g. float32, int64")] = None,
    weights: Annotated[str | None, typer.Option(help="state dict for a factory: .safetensors or .pt")] = None,
    trust_code: Annotated[bool, typer.Option(help="allow the model file to run code (pickles, TorchScript)")]
    = False,
    trust_pickle: Annotated[bool, typer.Option(hidden=True, help="old name of --trust-code")] = False,
    recipe_file: Annotated[Path | None, typer.Option(help="a TOML file of [[recipe]] tables")] = None,
    csv: Annotated[Path | None, typer.Option(help="also write the per-layer table of each batch size here "
                                                  "(one CSV, a batch column)")] = None,
    mode: Annotated[str, typer.Option(help="infer (one forward) or train (forward, loss, backward, optimizer "
                                           "step)")] = "infer",
    optimizer: Annotated[str, typer.Option(help="train mode: sgd (momentum 0.9), adam or adamw")] = "adamw",
    verify: Annotated[bool, typer.Option(help="train mode: also measure real training steps in a fresh process")]
    = False,
    timeout: Annotated[float, typer.Option(help="seconds the model's code may take in one stage (tracing, "
                                                "building)")] = 900.0,
    memory_cap: Annotated[str | None, typer.Option(help="resident memory the model's code may use, e.g. 8GB "
                                                        "(default: 90% of the memory available at start)")] = None,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """Per-layer parameters, bytes under each recipe and live activations, without materializing weights."""
    import dataclasses

    from planner.analysis.training import check_mode, check_optimizer
    from planner.measure.isolation import report_stage

    check_limits(timeout, memory_cap)  # applied by the supervisor around this process

    if check_mode(mode) == "train":
        check_optimizer(optimizer)
        _inspect_training(model, recipes or "fp32", batch_size, optimizer, verify, input_shape=input_shape,
                          input_dtype=input_dtype, weights=weights, trust_code=trust_code or trust_pickle,
                          recipe_file=recipe_file, csv=csv)
        return
    if verify:
        raise PlannerError("--verify measures training steps: use it with --mode train")
    recipes = recipes or "fp32,bf16,int8-dynamic,int4-g128"

    import pandas as pd
    from rich.table import Table

    from planner.analysis.inspection import inspect_model, summary_row
    from planner.core.units import format_bytes
    from planner.models.sources import resolve_source
    from planner.recipes.recipe import default_recipes, load_recipe_file, select_recipes
    from planner.report import plain

    chosen = select_recipes(load_recipe_file(recipe_file) if recipe_file else default_recipes(), recipes)
    batches = _batch_sizes(batch_size)
    report_stage("loading the model")
    source = resolve_source(model, weights=weights, trust_code=trust_code or trust_pickle, input_shape=input_shape,
                            input_dtype=input_dtype, weightless=True)
    report_stage("describing the model (weightless)")
    meta_model = source.build("meta")
    inspections = []
    for batch in batches:
        report_stage(f"tracing the forward (batch {batch})" if batch else "tracing the forward")
        inputs = (dataclasses.replace(source, batch_size=batch) if batch else source).example_inputs()
        inspections.append(inspect_model(meta_model, inputs, chosen, batch or int(inputs[0].shape[0])))
    first = inspections[0]
    table = Table(title=plain(f"{model}: layers (activations in {chosen[0].dtype}, batch {first.batch}; "
                              "* = quantized by the recipe)"))
    for column in first.layers.columns:
        table.add_column(plain(column), justify="left" if column in ("layer", "type", "peak here") else "right")
    for _, row in first.layers.iterrows():
        table.add_row(*[plain(f"{value:,}" if isinstance(value, int) else value) for value in row])
    console.print(table)
    summary = pd.DataFrame([summary_row(item, recipe) for item in inspections for recipe in chosen])
    totals = Table(title="totals (weights resident + liveness peak of one inference forward)")
    for column in summary.columns:
        totals.add_column(plain(column))
    for _, row in summary.iterrows():
        totals.add_row(*[plain(format_bytes(value) if str(column).endswith("bytes") else
                               (f"{value:,}" if isinstance(value, int) else value))
                         for column, value in row.items()])
    console.print(totals)
    report_stage("writing the results")
    if csv:
        from planner.report import write_atomic, writing_to

        frames = [item.layers.assign(batch=item.batch) for item in inspections]
        with writing_to(csv.parent, "--csv", "nothing was written"):
            write_atomic(csv, pd.concat(frames).to_csv(index=False))
        console.print(f"wrote {csv}", markup=False, highlight=False)


def _inspect_training(model: str, recipes: str, batch_size: str | None, optimizer: str, verify: bool, *,
                      input_shape: str | None, input_dtype: str | None, weights: str | None, trust_code: bool,
                      recipe_file: Path | None, csv: Path | None) -> None:
    """`inspect --mode train`: a table per batch size of the training step's memory (planner.analysis.training)."""
    import dataclasses

    import pandas as pd
    from rich.table import Table

    from planner.analysis.train_verify import training_row
    from planner.analysis.training import SGD_MOMENTUM
    from planner.measure.isolation import report_stage
    from planner.models.sources import resolve_source
    from planner.recipes.recipe import default_recipes, load_recipe_file, select_recipes
    from planner.report import plain

    chosen = select_recipes(load_recipe_file(recipe_file) if recipe_file else default_recipes(), recipes)
    report_stage("loading the model")
    source = resolve_source(model, weights=weights, trust_code=trust_code, input_shape=input_shape,
                            input_dtype=input_dtype)
    rows = []
    for batch in _batch_sizes(batch_size):
        report_stage(f"tracing a training step (batch {batch})" if batch else "tracing a training step")
        batched = dataclasses.replace(source, batch_size=batch) if batch else source
        size = batch or int(batched.example_inputs()[0].shape[0])
        rows.append([training_row(batched, recipe, size, optimizer, verify) for recipe in chosen])
    optimizer_text = f"sgd, momentum {SGD_MOMENTUM}" if optimizer == "sgd" else optimizer
    for batch_rows in rows:
        frame = pd.DataFrame(batch_rows).drop(columns=["batch", "optimizer", "note"])
        table = Table(title=plain(f"{model}: one training step, batch {batch_rows[0]['batch']}, {optimizer_text} "
                                  "(loss = sum of output means; peaks include the parameters)"))
        for column in frame.columns:
            table.add_column(plain(column), overflow="fold")
        for _, row in frame.iterrows():
            table.add_row(*[plain(_training_cell(str(column), value)) for column, value in row.items()])
        console.print(table)
        for row in batch_rows:
            if row["note"]:
                console.print(f"{row['recipe']}: {row['note']}", markup=False, highlight=False)
    if csv:
        from planner.report import write_atomic, writing_to

        with writing_to(csv.parent, "--csv", "nothing was written"):
            write_atomic(csv, pd.DataFrame([row for batch_rows in rows for row in batch_rows]).to_csv(index=False))
        console.print(f"wrote {csv}", markup=False, highlight=False)


def _training_cell(column: str, value: object) -> str:
    from planner.core.units import format_bytes

    if value is None or value != value:  # missing, or NaN where another row has the column
        return "-"
    if column.startswith("diff"):
        return f"{float(value):+.1%}"  # type: ignore[arg-type]
    return format_bytes(value) if isinstance(value, int | float) else str(value)  # type: ignore[arg-type]


def _batch_sizes(text: str | None) -> list[int | None]:
    if text is None:
        return [None]
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise PlannerError(f"--batch-size {text!r}: give whole numbers, e.g. 1,8,64") from error
    if not sizes or min(sizes) < 1:
        raise PlannerError(f"--batch-size {text!r}: give whole numbers of at least 1, e.g. 1,8,64")
    return list(sizes)


@app.command("recipes")
def list_recipes(
    recipe_file: Annotated[Path | None, typer.Option(help="a TOML file of [[recipe]] tables")] = None,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """The recipe set: what each does, which layers it touches, whether it runs here."""
    from rich.table import Table

    from planner.recipes.recipe import default_recipes, load_recipe_file
    from planner.report import plain

    available = load_recipe_file(recipe_file) if recipe_file else default_recipes()
    table = Table(title=plain(f"recipes ({available[0].source})"))
    for column in ("name", "touches", "runs here", "description"):
        table.add_column(column, overflow="fold")
    for recipe in available:
        scheme = recipe.scheme
        missing = scheme.missing_kernel() if scheme else None
        runs = "no: " + missing if missing else "yes"
        table.add_row(*map(plain, (recipe.name, recipe.touches(), runs, recipe.description)))
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    if not debug:
        quiet_library_noise()
    command = typer.main.get_command(app)
    try:
        # typer returns (not raises) the exit code of an Exit, Ctrl-C's 130 included.
        code = command.main(args=args, prog_name="planner", standalone_mode=False)
        if isinstance(code, int) and code:
            if code == 130:
                errors.print("interrupted", markup=False)
            return code
    except NothingFits as error:
        return error.exit_code
    except PlannerError as error:
        if debug:
            traceback.print_exc()
        errors.print(f"error: {error}", markup=False, highlight=False)
        return error.exit_code
    except Exit as error:
        return error.exit_code
    except NoArgsIsHelpError as error:
        console.print(error.ctx.get_help() if error.ctx else "planner --help", markup=False, highlight=False)
        return 0
    except ClickException as error:
        errors.print(f"error: {error.format_message()} (see planner --help)", markup=False, highlight=False)
        return 2
    except Abort:
        errors.print("interrupted", markup=False)
        return 130
    except KeyboardInterrupt:
        errors.print("interrupted", markup=False)
        return 130
    except (OSError, RuntimeError) as error:
        line = _write_failure(error)
        if line is None:
            return _internal_error(error, debug)
        if debug:
            traceback.print_exc()
        errors.print(f"error: {line}", markup=False, highlight=False)
        return 2
    except Exception as error:  # a bug, not bad input: one line unless --debug asks for the traceback
        return _internal_error(error, debug)
    return 0


# A full disk, a quota, a read-only or forbidden place: the user's to fix, not a bug.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}
# What torch's C++ writer says instead of an errno when torch.save or torch.jit.save cannot write.
TORCH_WRITE_FAILURES = ("basic_ios::clear", "PytorchStreamWriter failed writing", "file write failed", "unexpected pos")


def _write_failure(error: OSError | RuntimeError) -> str | None:
    """The one line for a write that failed for a reason the user can fix, else None (an internal error)."""
    if isinstance(error, OSError):
        if error.errno not in WRITE_ERRNOS:
            return None
        where = f" ({error.filename})" if error.filename else ""
        return (f"cannot write{where}: {error.strerror or error}; free space, or choose a directory you can write "
                "(the work directory is under TMPDIR)")
    text = str(error)
    if not any(marker in text for marker in TORCH_WRITE_FAILURES):
        return None
    return (f"saving a model file failed ({text.strip().splitlines()[0][:120]}): the disk is probably full; free "
            "space, or set TMPDIR to a directory with room for the artifacts")


def _internal_error(error: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    errors.print(f"error: internal error {type(error).__name__}: {str(error)[:300]} "
                 "(rerun with --debug and report the traceback)", markup=False, highlight=False)
    return 3


def _interrupt(number: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM and SIGHUP stop the plan the way Ctrl-C does: workers and files cleaned


def entry_point() -> None:
    """The console command. `plan` and `inspect` run the model's code, so they run as a watched child of a
    thin supervisor (planner.cli.supervisor); the child, and every other command, runs main() here."""
    import os
    import signal

    from planner.cli import supervisor
    from planner.measure import isolation

    args = sys.argv[1:]
    if supervisor.wants_supervisor(args):
        sys.exit(supervisor.supervise(args))
    # Ctrl-C raises KeyboardInterrupt even where the shell started us with SIGINT ignored (a background job),
    # and SIGTERM/SIGHUP do the same.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _interrupt)
    # From here an interrupt is ours to handle (the supervisor forwards it); no model code runs yet: no clock.
    isolation.report_stage("starting", clocked=False)
    if "--debug" in args:
        import faulthandler

        faulthandler.enable()  # a segfault in the model's code prints the Python stack that led to it
    code = 130
    try:
        code = main()
    except KeyboardInterrupt:  # an interrupt that arrived outside main's own handling
        errors.print("interrupted", markup=False)
    finally:
        if supervisor.is_supervised():
            # The supervisor kills what is left of our process group and removes the work directory; skipping
            # the interpreter's teardown (seconds with torch loaded, here and in the fork server) makes an
            # interrupt end promptly.
            isolation.report_finished(code)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        # Stopping the fork server lets multiprocessing's resource tracker exit and unlink what it tracks.
        isolation.stop_forkserver()
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
