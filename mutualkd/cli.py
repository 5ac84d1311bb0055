"""The ``mutualkd`` command: run, validate, plugins, report, analyze, sweep, export, convert-checkpoint.

Every error the user can fix is printed as one message (where, what, how to fix) with
exit code 2, never as a traceback.

This module imports nothing heavy (torch, timm, accelerate, matplotlib, numpy): each
command imports what it needs inside its function, so ``mutualkd --help`` and
``mutualkd --version`` answer at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import sys
from typing import TYPE_CHECKING, Annotated, Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text
import typer

from mutualkd.errors import EXIT_BAD_INPUT, NonFiniteLossError, UserError, in_file

if TYPE_CHECKING:
    from mutualkd.config import Recipe
    from mutualkd.recipe_doc import ExplainRow

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Help text is rich markup (said here, not left to typer's default), so a literal bracket,
    # a TOML table name, is escaped with a backslash or rich drops it as an unknown tag.
    rich_markup_mode="rich",
    help="Mutual learning and knowledge distillation for timm models.",
)
err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)

SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe field, e.g. --set run.epochs=5 (repeatable)."),
]
BlockOpt = Annotated[
    Optional[list[str]],
    typer.Option("--block-plugin", help="Do not load this plugin (name or kind:name); repeatable."),
]


def _fail(e: UserError) -> None:
    err_console.print("[bold red]error:[/] ", end="")
    err_console.print(str(e), markup=False, soft_wrap=True)
    raise typer.Exit(e.exit_code)


def _print_version(value: bool) -> None:
    if value:
        from mutualkd import __version__

        out_console.print(f"mutualkd {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _options(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Mutual learning and knowledge distillation for timm models."""
    from mutualkd._logging import attach_console

    # The library's lines (notes, warnings, one per epoch, the summary) are records of the
    # mutualkd logger: printed on the console for this command, whatever else handles them.
    ctx.call_on_close(attach_console())


def _load(recipe: Path, overrides: list[str] | None):
    from mutualkd.config import load_recipe

    return load_recipe(recipe, overrides or [])


def _check_fit(rec: Recipe, recipe_file: str) -> None:
    """The recipe's peers and schedule fit its strategy (exit 2 before any Accelerator, tracker or lock)."""
    from mutualkd.config import check_strategy_fit, resolve_params

    cls, _ = resolve_params(rec, recipe_file)
    check_strategy_fit(rec, recipe_file, cls)


@app.command()
def run(
    recipe: Annotated[Optional[Path], typer.Argument(help="The TOML recipe to run.")] = None,
    set_: SetOpt = None,
    resume: Annotated[
        Optional[Path],
        typer.Option("--resume", help="Continue the run in this folder from its newest checkpoint that loads, or from"
                     " one checkpoint folder of it (RUN_DIR/checkpoints/step-...)."),
    ] = None,
    block_plugin: BlockOpt = None,
) -> None:
    """Train the peers of RECIPE."""
    from mutualkd import registry
    from mutualkd.runlock import ensure_not_busy, run_folder_of

    try:
        registry.block(block_plugin or [])
        if recipe is None:
            if resume is None:
                raise UserError("no recipe given", hint="run `mutualkd run RECIPE.toml` or `mutualkd run --resume RUN_DIR`")
            recipe = run_folder_of(resume) / "recipe.toml"
        rec = _load(recipe, set_)  # the strategy's parameters and the data keys are resolved here
        _check_fit(rec, str(recipe))
        # A run folder another process is writing is refused before torch is even loaded (by the
        # main process of a launch: the others' own rank 0 takes the lock later, in the Trainer).
        if os.environ.get("RANK", "0") == "0":
            ensure_not_busy(run_folder_of(resume) if resume is not None else Path(rec.run.out_dir) / rec.run.name)
    except UserError as e:
        _fail(e)
    from mutualkd.engine import RunInterrupted, Trainer
    from mutualkd.engine.process import end_launched_process

    code: int | None = None  # set when every process ends the same way; then a launch's processes end at once
    try:
        try:
            trainer = Trainer(rec, recipe_file=str(recipe), resume=resume)
            trainer.fit()
            code = 0
        except UserError as e:
            _fail(in_file(e, str(recipe)))  # e.g. an unreadable image found while training: [data.skip_corrupt]
        except NonFiniteLossError as e:
            err_console.print("[bold red]training stopped:[/] ", end="")
            err_console.print(str(e), markup=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except RunInterrupted as e:
            err_console.print(
                f"interrupted (signal {e.signum}); a checkpoint was written. Resume with:\n"
                f"  mutualkd run --resume {e.run_dir}",
                markup=False,
            )
            raise typer.Exit(e.exit_code) from None
    except typer.Exit as e:
        code = e.exit_code
        raise
    finally:
        if code is not None:
            end_launched_process(code)


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="The TOML recipe to check.")],
    set_: SetOpt = None,
    data: Annotated[bool, typer.Option("--data/--no-data", help="Also check that the data set can be loaded.")] = True,
    explain: Annotated[
        bool,
        typer.Option("--explain", help="Also print every key of the resolved recipe: value, set or default, meaning."),
    ] = False,
) -> None:
    """Check RECIPE (fields, strategy and its parameters, model names, data) without training.

    The keys, their defaults and what they do: docs/recipes.md, or --explain for this recipe.
    """
    try:
        rec = _load(recipe, set_)  # before the engine's imports (torch, timm, accelerate): a bad key answers fast
        from mutualkd.engine import check_recipe
        from mutualkd.recipe_doc import explain as explain_rows

        # The same checks as a run, writing nothing: strategy and parameters, model names
        # and, with the data, every peer probed at the data's size and the strategy's set-up.
        # Nothing is blocked process-wide: the recipe's run.block_plugins apply to it only.
        check_recipe(rec, recipe_file=str(recipe), data=data)
        rows = explain_rows(rec) if explain else []  # the strategy's parameters as the load resolved them
    except UserError as e:
        _fail(in_file(e, str(recipe)))
    if explain:
        out_console.print(_explain_table(str(recipe), rows))
    names = ", ".join(f"{n} ({p.model})" for n, p in zip(rec.peer_names(), rec.peers))
    out_console.print(f"[green]ok[/] {recipe}: strategy {rec.strategy.name}, {len(rec.peers)} peers: {names}; data {rec.data.dataset}")


def _explain_table(recipe_file: str, rows: list[ExplainRow]) -> Table:
    table = Table(title=f"{recipe_file}, resolved (reference: docs/recipes.md)", title_justify="left")
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("from", no_wrap=True)
    table.add_column("what it does", overflow="fold")
    for r in rows:
        style = "" if r.source == "recipe" else "dim"
        # Text cells: values and descriptions hold brackets ([optimizer]) that are not markup.
        table.add_row(Text(r.key), Text(r.value), Text(r.source), Text(r.description), style=style)
    return table


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    block_plugin: BlockOpt = None,
) -> None:
    """List the installed strategy, metric and data set plugins and their status.

    A plugin whose import or validation fails is listed with status "error" and the
    reason; the others keep working. MUTUALKD_DISABLE_PLUGIN_AUTOLOAD=1 switches off
    every third-party plugin (status "disabled"); --block-plugin NAME and
    MUTUALKD_BLOCK_PLUGINS block single ones (status "blocked"). A recipe's
    run.block_plugins applies to that recipe's run only.
    """
    from mutualkd import registry

    registry.block(block_plugin or [], source="--block-plugin")
    infos = registry.infos(load=True)
    known = {i.name for i in infos} | {f"{i.kind}:{i.name}" for i in infos}
    unmatched = sorted({n for names in registry.blocks().values() for n in names} - known)
    if as_json:
        sys.stdout.write(json.dumps([i.as_dict() for i in infos], indent=2) + "\n")
        return
    table = Table(title="mutualkd plugins")
    for col in ("kind", "name", "distribution", "version", "module", "status"):
        table.add_column(col, overflow="fold", no_wrap=col in ("kind", "name", "version", "status"))
    style = {"ok": "green", "blocked": "yellow", "disabled": "dim", "not loaded": "dim"}
    for i in infos:
        table.add_row(i.kind, i.name, i.distribution, i.version, i.value, f"[{style.get(i.status, 'red')}]{i.status}[/]")
    out_console.print(table)
    # Reasons are printed in full below the table: an import error does not fit a cell.
    for i in infos:
        if i.error and i.status not in ("disabled",):
            colour = style.get(i.status, "red")
            out_console.print(f"[{colour}]{i.status}[/] {i.kind} {i.name} ({i.distribution} {i.version}): ", end="")
            out_console.print(i.error, markup=False, soft_wrap=True)
    if not registry.autoload():
        out_console.print(f"third-party plugins are disabled: {registry.ENV_DISABLE_AUTOLOAD} is set", markup=False)
    if unmatched:
        out_console.print(f"note: blocked names that match no plugin: {', '.join(unmatched)}", markup=False)


@app.command()
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN_DIR", help="Run folders (each holds metrics.jsonl), e.g. runs/*/.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the plots and report.md.")] = Path("report"),
) -> None:
    """Plot the loss terms and test top-1 of each run and compare runs in a table.

    Writes OUT/<run>/{losses,losses_steps,top1}.png, OUT/top1_comparison.png and OUT/report.md, and prints the tables.

    Runs whose recipes differ only in run.seed and run.name form a group, reported as mean +- std over its seeds.
    """
    from mutualkd.report import make_report

    try:
        make_report(run_dirs, out, console=out_console)
    except UserError as e:
        _fail(e)


@app.command()
def analyze(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR", help="Finished run folders, e.g. runs/ie_kd-s*/.")],
    teacher: Annotated[
        Optional[Path], typer.Option("--teacher", help="Teacher run or checkpoint folder; default: the run's strategy.teacher.")
    ] = None,
    teacher_peer: Annotated[
        Optional[str], typer.Option("--teacher-peer", help="The teacher's peer name or index; default: strategy.teacher_peer.")
    ] = None,
    peer: Annotated[str, typer.Option("--peer", help="The student: a peer name or index of each run.")] = "0",
    best: Annotated[bool, typer.Option("--best", help="Use checkpoints/best instead of the latest checkpoint.")] = False,
    max_samples: Annotated[
        Optional[int], typer.Option("--max-samples", min=4, help="Use only the first N test images.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per run, for scripts.")] = False,
) -> None:
    """Linear CKA between each run's student and its teacher, feature maps over the whole test split.

    Prints, per run, CKA of the flattened feature maps and of the pooled ones, each biased and
    debiased (unbiased HSIC), with the test top-1 of both networks (docs/methods.md).
    """
    from mutualkd.analyze import analyze_run

    def as_index(v: str) -> str | int:
        return int(v) if v.isdigit() else v

    rows = []
    try:
        for run_dir in run_dirs:
            rows.append(analyze_run(run_dir, peer=as_index(peer), teacher=teacher,
                                    teacher_peer=None if teacher_peer is None else as_index(teacher_peer),
                                    checkpoint=run_dir / "checkpoints" / "best" if best else None, max_samples=max_samples))
    except UserError as e:
        _fail(e)
    if as_json:
        sys.stdout.write("".join(json.dumps(r.as_dict()) + "\n" for r in rows))
        return
    table = Table(title="teacher-student linear CKA on the test split", title_justify="left")
    for col in ("run", "student", "teacher", "n", "top-1 S / T", "CKA maps", "debiased", "CKA pooled", "debiased"):
        table.add_column(col, overflow="fold", justify="left" if col in ("run", "student", "teacher") else "right")
    for r in rows:
        table.add_row(Text(r.run), Text(f"{r.student} ({r.student_model})"), Text(f"{r.teacher_peer} ({r.teacher_model})"),
                      str(r.samples), f"{r.student_top1:.2f} / {r.teacher_top1:.2f}", f"{r.cka_maps:.4f}",
                      f"{r.cka_maps_debiased:.4f}", f"{r.cka_pooled:.4f}", f"{r.cka_pooled_debiased:.4f}")
    out_console.print(table)


@app.command()
def sweep(
    recipe: Annotated[Path, typer.Argument(help="The TOML recipe to sweep (it may hold a \\[sweep] table).")],
    grid: Annotated[
        Optional[list[str]],
        typer.Option("--grid", "-g", help="A recipe key and its values, e.g. strategy.weight=0.5,1 (repeatable)."),
    ] = None,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="Seeds of every grid point, e.g. 0,1,2.")] = None,
    set_: SetOpt = None,
    out_dir: Annotated[
        Optional[Path], typer.Option("--out-dir", help="Folder of the sweep's runs; default: OUT_DIR/NAME-sweep.")
    ] = None,
    print_only: Annotated[
        bool, typer.Option("--print", help="Print one `mutualkd run` command per run instead of running them.")
    ] = False,
    report_: Annotated[bool, typer.Option("--report/--no-report", help="Write the report of the sweep at the end.")] = True,
) -> None:
    """Run RECIPE for every combination of the --grid values and --seeds, one run folder each.

    Runs go one after another; finished runs are skipped and interrupted ones resumed, so
    the same command continues a sweep. At the end `mutualkd report` groups the runs by
    their swept values (OUT_DIR/NAME-sweep/report).
    """
    from mutualkd.sweep import plan_sweep, print_commands, run_sweep

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()] if seeds else None
    except ValueError:
        _fail(UserError(f"--seeds {seeds[:100]!r} is not a list of integers", hint="write e.g. --seeds 0,1,2"))
    try:
        plan = plan_sweep(recipe, grid or [], seed_list, set_ or [], out_dir)
    except UserError as e:
        _fail(e)
    if print_only:
        sys.stdout.write(print_commands(plan) + "\n")
        return
    out_console.print(f"sweep of {len(plan.runs)} run(s) in {plan.folder}", markup=False)
    try:
        outcome = run_sweep(plan, console=out_console)
    except KeyboardInterrupt:
        err_console.print("sweep stopped; run the same command again to continue it", markup=False)
        raise typer.Exit(130) from None
    failed = outcome["failed"]
    out_console.print(f"{len(outcome['done'])} run(s) done, {len(outcome['resumed'])} resumed,"
                      f" {len(outcome['skipped'])} skipped, {len(failed)} failed", markup=False)
    finished = [r.folder for r in plan.runs if (r.folder / "metrics.jsonl").is_file()]
    if report_ and finished:
        from mutualkd.report import make_report

        try:
            make_report(finished, plan.folder / "report", console=out_console)
        except UserError as e:
            _fail(e)
    if failed:
        raise typer.Exit(1)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run folder, or one of its checkpoint folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write to: the peer's model.safetensors and"
                                      " config.json (--peer), else one sub-folder per peer.")],
    peer: Annotated[Optional[str], typer.Option("--peer", help="Export this peer only (default: every peer).")] = None,
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="best: checkpoints/best; last: the latest complete checkpoint.")
    ] = "last",
    ema: Annotated[bool, typer.Option("--ema", help="Export the peers' EMA copies instead of their raw weights.")] = False,
    best: Annotated[bool, typer.Option("--best", hidden=True, help="The same as --checkpoint best.")] = False,
    license_id: Annotated[Optional[str], typer.Option("--license", help="The weights' license for the model card"
                                                      " (a Hub id: apache-2.0, mit, cc-by-4.0, ...).")] = None,
    repo_id: Annotated[Optional[str], typer.Option("--repo-id", help="The Hub repository (ORG/NAME) the folder will"
                                                   " be uploaded to, for the model card's loading example.")] = None,
) -> None:
    """Write a run's peers as timm models in Hugging Face layout (timm's save_for_hf), with a model card.

    Each folder loads with plain timm: import mutualkd, timm;
    timm.create_model("local-dir:OUT", pretrained=True); its config.json holds the input
    size, mean, std, number of classes and class names, its README.md the model card the
    Hugging Face Hub shows (docs/weights.md). No file names a path of this machine.
    """
    from mutualkd.export import export_run

    if checkpoint not in ("best", "last"):
        _fail(UserError(f"--checkpoint {checkpoint!r} is neither best nor last", hint="write --checkpoint best or last"))
    try:
        done = export_run(run_dir, out, peer=peer, ema=ema, checkpoint="best" if best else checkpoint,  # type: ignore[arg-type]
                          license_id=license_id, repo_id=repo_id)
    except UserError as e:
        _fail(e)
    for d in done:
        out_console.print(f"exported {d.peer}{' (EMA)' if d.ema else ''} ({d.architecture}) from {d.checkpoint}"
                          f" to {d.folder}", markup=False)
    if done:
        out_console.print(f"load it: import mutualkd, timm; timm.create_model(\"local-dir:{done[0].folder}\","
                          " pretrained=True)", markup=False)


@app.command("convert-checkpoint")
def convert_checkpoint(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="A run folder (all its checkpoints) or one checkpoint folder.")],
    trust: Annotated[
        bool, typer.Option("--trust", help="Confirm that you trust the files (no question asked).")
    ] = False,
) -> None:
    """Rewrite checkpoints that hold pickled objects mutualkd no longer reads, so that they load safely.

    Converting unpickles each such checkpoint in full once, which runs whatever code it
    holds: do it only for checkpoints you wrote yourself (an earlier mutualkd version).
    """
    if not trust:
        err_console.print(f"Converting unpickles the checkpoints under {path} in full, which runs any code they hold."
                          " Convert only checkpoints you wrote yourself.", markup=False)
        answer = typer.prompt("Do you trust these files? [yes/no]", default="no", err=True)
        if answer.strip().lower() not in ("y", "yes"):
            err_console.print("nothing converted", markup=False)
            raise typer.Exit(EXIT_BAD_INPUT)
    from mutualkd.convert import convert_checkpoint as convert

    try:
        done = convert(path)
    except UserError as e:
        _fail(e)
    for folder, what in done:
        out_console.print(f"{folder}: {what}", markup=False)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UserError as e:  # pragma: no cover - commands catch their own
        err_console.print(f"error: {e}", markup=False)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
