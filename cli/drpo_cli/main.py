"""The ``drpo`` command line. Every command wraps a library call; nothing here the API cannot do."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from drpo_core.errors import DrpoError, RunAborted

#: the width of a line written to a file or a pipe: wide enough that no table cell or message is cut
LOG_WIDTH = 10_000


def uncut_console(stderr: bool = False) -> Console:
    """A console that never cuts or wraps a line when not writing to a terminal (a log file, a pipe, where rich
    would assume 80 columns and cut table cells with "…"); on a terminal, or with COLUMNS set, its width."""
    made = Console(stderr=stderr)
    if not made.is_terminal and not os.environ.get("COLUMNS"):
        made.width = LOG_WIDTH
    return made


console = uncut_console()
DEFAULT_RECIPE = Path(__file__).with_name("default.yaml")


class _OneLineErrors(TyperGroup):
    """Bad input becomes one line on stderr and exit code 2; ``--debug`` shows the traceback. An abort
    (a second Ctrl-C during a run, ``RunAborted``, or a Ctrl-C outside the loop) is one line and 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DrpoError as error:
            if ctx.meta.get("drpo.debug"):
                raise
            typer.echo(f"Error: {error}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as error:
            if ctx.meta.get("drpo.debug"):
                raise
            typer.echo(str(error) or "aborted", err=True)
            if isinstance(error, RunAborted):  # at once: skip the interpreter's teardown (a second or more
                sys.stdout.flush()  # after torch); files are flushed as written, checkpoints atomic
                sys.stderr.flush()
                os._exit(130)
            raise typer.Exit(130) from None


app = typer.Typer(cls=_OneLineErrors, no_args_is_help=True, add_completion=False,
                  help="Drifting Preference Optimization for one-step image generators.")
config_app = typer.Typer(cls=_OneLineErrors, no_args_is_help=True, help="Show or check run configs.")
app.add_typer(config_app, name="config")
assets_app = typer.Typer(cls=_OneLineErrors, no_args_is_help=True,
                         help="Model files components download (not on the Hugging Face hub): list, fetch.")
app.add_typer(assets_app, name="assets")


@app.callback()
def _root(ctx: typer.Context,
          debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False):
    ctx.meta["drpo.debug"] = debug


# -- run configuration options shared by train and config show ----------------------------------

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML recipe (default: the toy world).")]
GeneratorOpt = Annotated[str | None, typer.Option(
    "--generator", help="Generator NAME[:VARIANT] (e.g. sd-turbo:paper, the paper's official switches).")]
RankerOpt = Annotated[list[str] | None, typer.Option(
    "--ranker", help="Ranker NAME[:VARIANT], repeatable: several are combined, in order (rankers.0, rankers.1, ...).")]
FeaturesOpt = Annotated[str | None, typer.Option("--features", help="Feature space name.")]
KernelOpt = Annotated[str | None, typer.Option("--kernel", help="Kernel name.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="dotted.key=value, repeatable; wins over all.")]
OutputOpt = Annotated[str | None, typer.Option("--output-dir", help="Run directory.")]


def _resolve(config, generator, ranker, features, kernel, assignments, output_dir):
    """The run's config: the embedded default recipe applies only when nothing names a component."""
    from drpo_core.config import names_a_component, read_yaml, resolve_config

    flags = {"generator": generator, "rankers": ranker, "features": features, "kernel": kernel,
             "output_dir": output_dir}
    if config is None and not names_a_component(flags, assignments):
        return resolve_config(base=read_yaml(DEFAULT_RECIPE), base_origin="default recipe", flags=flags,
                              assignments=assignments)
    return resolve_config(config, flags=flags, assignments=assignments)


@app.command()
def train(config: ConfigOpt = None, generator: GeneratorOpt = None, ranker: RankerOpt = None,
          features: FeaturesOpt = None, kernel: KernelOpt = None, assignments: SetOpt = None,
          output_dir: OutputOpt = None,
          resume: Annotated[str | None, typer.Option(
              help="Continue a run from its directory alone: 'latest' (with --output-dir RUN), a run directory "
                   "or a checkpoint directory. Only --set train.steps=N may change it (to run longer).")] = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Build every component, print the plan.")] = False):
    """Run DrPO (with no flags: the embedded toy-world default, a few minutes on a CPU)."""
    from drpo_core.preflight import check_models_cached, check_run
    from drpo_core.runs import resume_config
    from drpo_core.trainer import Trainer

    if resume is not None:
        changes = {"--config": config, "--generator": generator, "--ranker": ranker, "--features": features,
                   "--kernel": kernel}
        resolved, checkpoint, notes = resume_config(resume, output_dir, assignments or [], changes)
        for note in notes:
            console.print(note)
    else:
        resolved, checkpoint = _resolve(config, generator, ranker, features, kernel, assignments, output_dir), None
    # before any model loads: the device, the prompt files, the output directory (a new run must not land on
    # another run's), and offline, every hub model the components name
    check_run(resolved, new_run=checkpoint is None)
    check_models_cached(resolved)
    trainer = Trainer(resolved, command_line=sys.argv, console=console)
    if dry_run:
        for line in trainer.plan():
            console.print(line)
        return
    trainer.train(resume=checkpoint)


@config_app.command("show")
def config_show(config: ConfigOpt = None, generator: GeneratorOpt = None, ranker: RankerOpt = None,
                features: FeaturesOpt = None, kernel: KernelOpt = None, assignments: SetOpt = None,
                output_dir: OutputOpt = None,
                origins: Annotated[bool, typer.Option(help="Show where each value comes from.")] = True):
    """Print the fully resolved config, each value with its origin."""
    from drpo_core.config import _flatten

    resolved = _resolve(config, generator, ranker, features, kernel, assignments, output_dir)
    if not origins:
        typer.echo(resolved.to_yaml())
        return
    table = Table("key", "value", "origin", box=None, pad_edge=False)
    for key, value in _flatten(resolved.to_dict()).items():
        table.add_row(key, json.dumps(value), resolved.origins.get(key, "default"))
    console.print(table)
    presets: dict[str, list[str]] = {}  # "generator sd-turbo:paper" -> the keys it set
    for key, origin in resolved.origins.items():
        kind, _, rest = origin.partition(" ")
        if kind in ("generator", "feature", "ranker", "kernel") and ":" in rest:
            presets.setdefault(origin, []).append(key)
    for origin, keys in presets.items():
        console.print(f"{origin} set: {', '.join(sorted(keys))}", highlight=False)
    if resolved.conflicts:
        console.print("recommendations that disagreed (the more specific wins: pair, generator, features, "
                      "rankers, kernel):")
        for conflict in resolved.conflicts:
            typer.echo(f"  {conflict}")


@config_app.command("validate")
def config_validate(file: Annotated[Path | None, typer.Argument(help="YAML recipe to check (or --config).")] = None,
                    config: ConfigOpt = None, generator: GeneratorOpt = None, ranker: RankerOpt = None,
                    features: FeaturesOpt = None, kernel: KernelOpt = None, assignments: SetOpt = None,
                    output_dir: OutputOpt = None):
    """Check a run as `drpo train` would before loading any model: syntax, types, ranges, plugin names and
    options, the device, the output directory and the prompt files (with no recipe: the embedded default)."""
    from drpo_core.preflight import check_run
    from drpo_core.runs import check_new_run_dir

    if file is not None and config is not None:
        raise DrpoError("config validate: give the recipe once, as FILE or as --config")
    recipe = file if file is not None else config
    resolved = _resolve(recipe, generator, ranker, features, kernel, assignments, output_dir)
    check_run(resolved, new_run=False)
    flags = {"generator": generator, "rankers": ranker, "features": features, "kernel": kernel,
             "output_dir": output_dir}
    typer.echo(f"{_validated(recipe, flags, assignments or [])}: valid")
    try:  # the recipe is fine; the folder may be taken (a saved run's own config.yaml validates too)
        check_new_run_dir(Path(resolved.config.output_dir))
    except DrpoError as taken:
        typer.echo(f"note: `drpo train` would not start a new run there: {taken}")


def _validated(recipe: Path | None, flags: dict[str, Any], assignments: list[str]) -> str:
    """What `config validate` checked: the recipe, the embedded default or the run the flags name, with flags."""
    from drpo_core.config import names_a_component

    with_flags = " with the flags" if assignments or any(flags.values()) else ""
    if recipe is not None:
        return f"{recipe}{with_flags}"
    if names_a_component(flags, assignments):
        return "the run given by the flags"
    return f"the embedded default recipe{with_flags}"


DeviceOpt = Annotated[str, typer.Option(help="auto (cuda if torch sees a GPU, else mps, else cpu), cpu, cuda, cuda:N, mps.")]
SeedsOpt = Annotated[str, typer.Option(help="Seeds per prompt: 42-46 (the paper's) or 1,5,9.")]
LimitOpt = Annotated[int | None, typer.Option(help="Only N prompts, a seeded subset (quick runs).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="(prompt, seed) images generated at once.")]


@app.command()
def sample(prompts: Annotated[str, typer.Option("--prompts", help="pickscore-test, parti, geneval or a prompt file "
                                                                  "(.txt, .jsonl, .tsv).")],
           out: Annotated[Path, typer.Option("--out", help="Folder for the images and manifest.jsonl.")],
           run: Annotated[Path | None, typer.Option("--run", help="A run directory (its latest weights).")] = None,
           generator: Annotated[str | None, typer.Option(
               "--generator", help="Sample a base generator NAME[:VARIANT], untrained (options: --set "
                                   "generator.KEY=V); with neither --run nor --generator, the embedded default's.")
           ] = None,
           assignments: Annotated[list[str] | None, typer.Option(
               "--set", help="generator.KEY=VALUE (with --generator), repeatable.")] = None,
           seeds: SeedsOpt = "42-46", limit: LimitOpt = None, device: DeviceOpt = "auto", batch_size: BatchOpt = 8,
           force: Annotated[bool, typer.Option(
               "--force", help="Replace the sample --out holds (its images, manifest and scores).")] = False):
    """Generate images for prompts x seeds (the noise `drpo eval` draws), with a manifest `drpo eval` reads."""
    from drpo_core.config import read_yaml
    from drpo_core.preflight import resolve_device
    from drpo_core.report import check_batch_size, eval_seeds, select_prompts
    from drpo_core.runs import (
        base_generator,
        check_run_alone,
        check_run_weights,
        check_sample_out,
        load_generator,
        sample_images,
    )

    device = resolve_device(device)  # the cheap checks first: nothing loads for a bad input
    check_batch_size(batch_size)
    check_sample_out(out, force)
    selection = select_prompts(prompts, limit)
    seed_list = eval_seeds(seeds)
    if run is None:  # the base generator alone: the embedded default's unless --generator names one
        if generator is None:
            generator = read_yaml(DEFAULT_RECIPE)["generator"]
            typer.echo(f"no --run or --generator: sampling the embedded default's generator {generator!r}, "
                       "untrained")
        model = base_generator(generator, assignments or [], device)
    else:
        from drpo_core.config import parse_assignment

        others = [key for key, _ in map(parse_assignment, assignments or []) if not key.startswith("generator.")]
        if others:
            raise DrpoError(f"--set {others[0]}: does not apply to `drpo sample` (only generator.KEY=VALUE, with "
                            "--generator)")
        check_run_alone(run, generator, assignments or [], "sample")
        check_run_weights(run, hint="give a run directory, or --generator NAME for a base generator")
        _, model = load_generator(run, device=device)
    manifest = sample_images(model, selection.records, seed_list, out, batch_size, selection.ids, force=force)
    typer.echo(f"wrote {manifest}: {len(selection.records) * len(seed_list)} images ({len(selection.records)} "
               f"prompts x {len(seed_list)} seeds) on {device}")


@app.command("eval")
def evaluate(target: Annotated[Path | None, typer.Argument(
                 help="A run directory (its latest weights against its base generator, on the same noise) or a "
                      "manifest.jsonl written by `drpo sample`.")] = None,
             generator: Annotated[str | None, typer.Option(
                 "--generator", help="Evaluate a base generator NAME[:VARIANT] alone (options: --set generator.KEY=V).")
             ] = None,
             rankers: Annotated[list[str] | None, typer.Option(
                 "--ranker", help="Ranker NAME[:VARIANT], repeatable (default: the paper's pickscore, clip, aesthetic, "
                                  "hpsv2).")] = None,
             assignments: Annotated[list[str] | None, typer.Option(
                 "--set", help="rankers.NAME.KEY=VALUE (a ranker's options, e.g. rankers.pickscore.model=DIR) or "
                               "generator.KEY=VALUE (with --generator); repeatable.")] = None,
             prompts: Annotated[str | None, typer.Option(
                 help="pickscore-test (default), parti, geneval or a prompt file.")] = None,
             limit: LimitOpt = None,
             seeds: Annotated[str | None, typer.Option(help="Seeds per prompt: 42-46 (default, the paper's) or 1,5,9.")]
             = None,
             device: DeviceOpt = "auto", batch_size: BatchOpt = 8,
             checkpoint: Annotated[str, typer.Option(help="The run's checkpoint: latest or a step.")] = "latest",
             json_path: Annotated[Path | None, typer.Option("--json", help="Write the full results here.")] = None):
    """Score base and fine-tuned images in the paper's units: mean ± std per ranker, the paired difference with
    a 95% interval (over prompts), per group too; a table, and JSON with --json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from drpo_core.preflight import resolve_device
    from drpo_core.report import print_report
    from drpo_core.runs import evaluate_target

    device = resolve_device(device)  # the cheap checks first: nothing loads for a bad input
    errors = uncut_console(stderr=True)  # a bar only on a terminal: to a log it is a stray blank line
    with Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=errors, transient=True, disable=not errors.is_terminal) as bar:

        def progress(total: int):
            task = bar.add_task("(prompt, seed) pairs", total=total)
            return lambda done: bar.advance(task, done)

        result = evaluate_target(target, generator=generator, rankers=rankers or [], assignments=assignments or [],
                                 prompts=prompts, limit=limit, seeds=seeds, device=device, batch_size=batch_size,
                                 checkpoint=checkpoint, json_path=json_path, progress=progress)
    print_report(result, console)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_path}", highlight=False)


@app.command()
def doctor(rankers: Annotated[list[str] | None, typer.Argument(
               help="Rankers to check (default: the recipe's, else every installed ranker that loads model "
                    "weights).")] = None,
           config: Annotated[Path | None, typer.Option(
               "--config", "-c", help="Recipe whose rankers and eval.rankers sections give the options.")] = None,
           assignments: Annotated[list[str] | None, typer.Option(
               "--set", help="rankers.NAME.KEY=VALUE, repeatable (e.g. rankers.pickscore.model=/models/ps).")] = None,
           device: DeviceOpt = "auto"):
    """Check rankers with your weights on four photographs, each with a matching and a mismatching caption:
    one line per ranker, exit code 0 when all pass, 1 when one fails."""
    from drpo_core.devices import resolve_device
    from drpo_core.doctor import exit_code, requests, run_doctor

    checks = requests(rankers or [], assignments or [], config)  # bad input fails here, before any model loads
    where = resolve_device(device)
    verdicts = run_doctor(checks, device=where)
    for verdict in verdicts:
        typer.echo(verdict.line)
    raise typer.Exit(exit_code(verdicts))


@app.command()
def export(run: Annotated[Path, typer.Argument(help="Run directory.")],
           out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN/export-FORMAT).")] = None,
           format: Annotated[str, typer.Option("--format", help="diffusers or kohya.")] = "diffusers",
           fuse: Annotated[bool, typer.Option("--fuse", help="Write a full pipeline with the weights fused.")] = False):
    """Export a run's trained generator for use outside drpo (with a model card)."""
    from drpo_core.runs import load_generator

    resolved, model = load_generator(run)
    if format not in model.export_formats:
        formats = ", ".join(model.export_formats) or "none"
        raise DrpoError(f"generator {resolved.config.generator.name!r} cannot export {format!r} (formats: {formats})")
    target = out or run / f"export-{format}{'-fused' if fuse else ''}"
    card = {"config": resolved.to_dict(), "run": run.name, "metrics": _last_eval(run),
            "ranker": ", ".join(r.name for r in resolved.config.rankers)}
    typer.echo(f"wrote {model.export(target, format=format, fuse=fuse, card=card)}")


def _last_eval(run: Path) -> dict[str, Any]:
    from drpo_core.jsonl import read_jsonl

    log = run / "eval.jsonl"
    records = read_jsonl(log, what="evaluation log", skip_torn=True) if log.is_file() else []
    return records[-1][1] if records else {}


@app.command("list-plugins")
def list_plugins(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False):
    """Every plugin, the components it registers with their summaries, where it comes from, and its state."""
    from drpo_core.registry import get_registry

    registry = get_registry()
    rows = [_plugin_row(info, registry.clashes) for info in registry.plugins]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("plugin", "component", "summary", "distribution", "version", "state")
    for row in rows:
        state = row["state"] if row["error"] is None else f"{row['state']}: {row['error']}"
        state = "\n".join([state, *row["clashes"]])
        components = [(f"{kind} {name}", row["summaries"].get(f"{kind} {name}", ""))
                      for kind, names in row["components"].items() for name in names] or [("-", "")]
        for i, (component, summary) in enumerate(components):
            first = i == 0
            table.add_row(row["name"] if first else "", component, summary, row["distribution"] if first else "",
                          row["version"] if first else "", state if first else "")
    console.print(table)


@assets_app.command("list")
def assets_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Every registered asset: where it is cached, whether it is verified, its licence and source."""
    from drpo_core.assets import cache_dir, state
    from drpo_core.registry import get_registry

    rows = []
    for asset in get_registry().assets():
        found = state(asset)
        rows.append({"name": asset.name, "status": found.status, "path": str(found.path), "licence": asset.licence,
                     "sha256": asset.sha256, "url": asset.url, "summary": asset.summary})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("asset", "status", "licence", "cached at", box=None, pad_edge=False)
    for row in rows:
        table.add_row(row["name"], row["status"], row["licence"], row["path"])
    table.columns[3].overflow = "fold"
    console.print(table)
    console.print(f"cache: {cache_dir()} (DRPO_CACHE); `drpo assets fetch NAME` downloads one")


@assets_app.command("fetch")
def assets_fetch(name: Annotated[str, typer.Argument(help="Asset name (drpo assets list).")],
                 force: Annotated[bool, typer.Option("--force", help="Download again even if cached.")] = False
                 ) -> None:
    """Download an asset into the cache and check its SHA-256."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from drpo_core.assets import fetch, state
    from drpo_core.registry import get_registry

    asset = get_registry().asset(name)
    before = state(asset)
    with Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task(asset.name, total=None)
        path = fetch(asset, force=force, progress=lambda done, total: progress.update(task, completed=done,
                                                                                      total=total))
    after = state(asset)
    verb = "already cached" if before.present and not force else "fetched"
    typer.echo(f"{asset.name}: {verb} at {path} ({after.status})")


def _plugin_row(info: Any, clashes: dict[tuple[str, str], list[Any]]) -> dict[str, Any]:
    components: dict[str, list[str]] = {}
    for kind, name in info.components:
        components.setdefault(kind, []).append(name)
    clashing = [f"clash: {kind} {name!r} is also registered by "
                + ", ".join(s.plugin.name for s in specs if s.plugin is not info)
                for (kind, name), specs in clashes.items() if any(s.plugin is info for s in specs)]
    return {"name": info.name, "module": info.module, "distribution": info.distribution,
            "version": info.version, "builtin": info.builtin, "state": info.state, "error": info.error,
            "components": components, "summaries": info.summaries, "clashes": clashing}


def _add_plugin_commands() -> None:
    from drpo_core.registry import get_registry

    get_registry().add_commands(app)


_add_plugin_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
