"""An ablation: every arm x seed through the recipe, one W&B group, then the report.

    python recipes/ablate.py --config recipes/configs/ablation_recipe.yaml
    python recipes/ablate.py --config recipes/configs/ablation_padding.yaml --dry_run >jobs
    python recipes/ablate.py --config ... --arms classic --seeds 0 1 --eval_steps 50

An arm is any set of recipe flags (`recipes/mlm.py --help`), named in the ablation YAML's
``arms:``; ``recipe:`` holds the flags every arm shares. Each run is its own process, launched
exactly as a user launches the recipe:

    accelerate launch --config_file <accelerate_config> recipes/mlm.py [--config <recipe_config>]
        <recipe flags> <arm flags> --output_dir <output_dir>/<arm>/seed<k> --seed <k>
        --run_name <arm>-seed<k> --wandb_group <name> --wandb_tags <arm> seed<k>

Runs go seed by seed (every arm of seed 0, then seed 1, ...), so a partial ablation already holds
complete pairs. Arms are paired by construction: the recipe draws the data order from (seed, epoch)
and the masked positions from (seed, epoch, example index), whatever the arm.

* The ablation YAML is validated whole before anything is launched: its own keys, then each run's
  full flag set through the recipe's own parser (mlmkit.config), and the tracker packages.
* ``--dry_run`` prints one copy-pasteable command per run still to do (stdout, one per line; notes
  go to stderr), e.g. to submit each as its own cluster job; it writes and launches nothing.
* A run whose folder holds summary.json is finished and skipped; re-running the ablation after a
  failure runs only what is missing. A failed run is reported, the others still run, and the
  runner exits 1 at the end. Each run's output is appended to <run folder>/launch.log.
* Afterwards it writes the report (python -m mlmkit.report <output_dir>): report.md, report.json
  and PNG plots in <output_dir>, or in ``--report_dir`` (with a copy of the plan, ablation.json).
  When the arms differ in ``mask_padding`` the report adds the padding measurements (the eval
  loss with the mask withheld, pad sensitivity).

Flags other than the ones below are recipe flags applied to every arm: they override the YAML's
``recipe:`` section, and an arm's own flags still win (so ``--per_device_train_batch_size 8``
changes the padded arms, not the packed arms' row count).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if SRC.is_dir() and str(SRC) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(SRC))

from mlmkit.config.configio import did_you_mean, read_yaml_mapping, to_cli_args  # noqa: E402
from mlmkit.config.errors import ConfigError  # noqa: E402
from mlmkit.config.fields import FIELDS, MLMConfig, differences  # noqa: E402
from mlmkit.config.fileio import write_json_atomic  # noqa: E402
from mlmkit.config.parse import parse_config  # noqa: E402
from mlmkit.report.runs import PLAN_FILE  # noqa: E402  (read by the report)
from mlmkit.train.runfolder import RunFolder  # noqa: E402
from mlmkit.train.tracking import check_trackers  # noqa: E402

RECIPE = ROOT / "recipes" / "mlm.py"
ABLATION_KEYS = {
    "name": "the W&B group and the report's title",
    "output_dir": "folder of the runs (<output_dir>/<arm>/seed<k>) and of the report",
    "accelerate_config": "the `accelerate launch --config_file` of every run",
    "seeds": "a count (0..n-1) or a list of seeds",
    "reference": "the arm that paired differences are taken against",
    "comparisons": "extra paired differences, a list of [arm, against] pairs",
    "recipe_config": "a recipe YAML passed to every run as --config (optional)",
    "recipe": "recipe flags shared by every arm",
    "arms": "arm name -> recipe flags of that arm",
}
# Set per run by the runner; an ablation YAML that sets them would break the pairing or the layout.
RUNNER_FLAGS = {"output_dir": "`output_dir:` in the ablation YAML or --output_dir",
                "seed": "`seeds:` in the ablation YAML or --seeds",
                "run_name": "<arm>-seed<k>", "wandb_group": "`name:` in the ablation YAML",
                "wandb_tags": "<arm> seed<k>", "config": "`recipe_config:` in the ablation YAML"}
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ================================================================================ the ablation file
@dataclass
class Ablation:
    path: str
    name: str
    output_dir: Path
    accelerate_config: str
    seeds: list[int]
    reference: str
    comparisons: list[list[str]]
    recipe_config: str | None
    recipe: dict
    arms: dict[str, dict]


@dataclass
class PlannedRun:
    arm: str
    seed: int
    output_dir: Path
    recipe_args: list[str]   # everything after `recipes/mlm.py`
    config: MLMConfig        # what the recipe will resolve them to

    @property
    def label(self) -> str:
        return f"{self.arm}-seed{self.seed}"


def _fail(path: str, key: str, why: str, fix: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {why}. Fix: {fix}.")


def _resolve_file(path: str, key: str, value) -> str:
    """An existing file, as given (relative to the current folder) or relative to the checkout."""
    if not isinstance(value, str) or not value:
        raise _fail(path, key, f"{value!r} is not a path", f"give a file path, e.g. {key}: X.yaml")
    if Path(value).is_file():
        return value
    if not Path(value).is_absolute() and (ROOT / value).is_file():
        return _display(ROOT / value)
    raise _fail(path, key, f"no such file {value!r}", f"check the path (relative paths start from "
                f"{os.getcwd()} or the checkout {ROOT})")


def _display(path: Path) -> str:
    """Relative to the current folder when inside it (short, copy-pasteable commands)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _check_flags(path: str, where: str, flags) -> dict:
    """A mapping of recipe flags: known flag names, plain values, none of the runner's."""
    if flags is None:
        return {}
    if not isinstance(flags, dict):
        raise _fail(path, where, "expected a mapping of recipe flags",
                    "write `flag: value` lines, e.g. `learning_rate: 1.0e-4`")
    for key, value in flags.items():
        name = f"--{key}" if where == "--" else f"{where}.{key}"  # "--": from the command line
        if key in RUNNER_FLAGS:
            raise _fail(path, name, "is set per run by the ablation runner",
                        f"remove it (it comes from {RUNNER_FLAGS[key]})")
        if key not in FIELDS:
            hint = did_you_mean(key, FIELDS, "see recipes/mlm.py --help")
            raise _fail(path, name, "unknown recipe flag", f"remove or rename it ({hint})")
        if isinstance(value, dict) or (isinstance(value, list)
                                       and any(isinstance(v, (dict, list)) for v in value)):
            raise _fail(path, name, "nested values are not recipe flags",
                        "give a plain value or a list of plain values")
    return dict(flags)


def load_ablation(path: str) -> Ablation:
    """Read and check the ablation YAML (its own keys; the runs' flags are checked by `plan`)."""
    data = read_yaml_mapping(path, example="recipes/configs/ablation_padding.yaml")
    for key in data:
        if key not in ABLATION_KEYS:
            hint = did_you_mean(key, ABLATION_KEYS, "recipe flags go under `recipe:` or an arm; "
                                "the top-level keys are " + ", ".join(ABLATION_KEYS))
            raise _fail(path, str(key), "unknown key", f"remove or rename it ({hint})")

    name = data.get("name") or Path(path).stem
    if not isinstance(name, str) or not ARM_NAME.match(name):
        raise _fail(path, "name", f"{name!r} is not a plain name", "use letters, digits, _ . -")
    seeds = data.get("seeds", 3)
    if isinstance(seeds, bool) or not (
            (isinstance(seeds, int) and seeds >= 1)
            or (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(
                s, bool) and s >= 0 for s in seeds) and len(set(seeds)) == len(seeds))):
        raise _fail(path, "seeds", f"{seeds!r} is neither a positive count nor a list of distinct "
                    "seeds", "write e.g. `seeds: 3` or `seeds: [0, 1, 2]`")
    seeds = list(range(seeds)) if isinstance(seeds, int) else seeds

    arms_raw = data.get("arms")
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise _fail(path, "arms", "missing or empty", "give at least one arm, e.g. "
                    "`arms: {classic: {mlm_probability: 0.15}, high: {mlm_probability: 0.3}}`")
    arms = {}
    for arm, flags in arms_raw.items():
        if not isinstance(arm, str) or not ARM_NAME.match(arm) or re.match(r"^seed\d+$", arm):
            raise _fail(path, f"arms.{arm}", "not a usable arm name (it names folders and W&B "
                        "tags)", "use letters, digits, _ . - (and not seed<k>)")
        arms[arm] = _check_flags(path, f"arms.{arm}", flags)
    reference = data.get("reference", next(iter(arms)))
    if reference not in arms:
        raise _fail(path, "reference", f"{reference!r} is not an arm",
                    f"use one of {', '.join(arms)}")
    comparisons = data.get("comparisons") or []
    if not isinstance(comparisons, list) or not all(
            isinstance(c, list) and len(c) == 2 and all(a in arms for a in c) for c in comparisons):
        raise _fail(path, "comparisons", f"{comparisons!r} is not a list of [arm, against] pairs "
                    "of arms", f"e.g. [[packed_naive, packed]] with arms from {', '.join(arms)}")
    recipe_config = data.get("recipe_config")
    if recipe_config is not None:
        recipe_config = _resolve_file(path, "recipe_config", recipe_config)
    output_dir = data.get("output_dir") or f"outputs/{name}"
    if not isinstance(output_dir, str):
        raise _fail(path, "output_dir", f"{output_dir!r} is not a path", "give a folder path")
    accelerate_config = data.get("accelerate_config", "accelerate_configs/cpu.yaml")
    return Ablation(
        path=path, name=name, output_dir=Path(output_dir),
        accelerate_config=_resolve_file(path, "accelerate_config", accelerate_config),
        seeds=seeds, reference=reference, comparisons=comparisons, recipe_config=recipe_config,
        recipe=_check_flags(path, "recipe", data.get("recipe")), arms=arms)


def parse_overrides(tokens: list[str]) -> dict:
    """`--key value [value ...]` / `--key=value` pairs given after the runner's own flags."""
    flags: dict = {}
    key = None
    for token in tokens:
        if token.startswith("--"):
            key, _, value = token[2:].partition("=")
            flags[key] = [value] if value else []
        elif key is None:
            raise ConfigError(f"unexpected argument {token!r}. "
                              "Fix: recipe flags are `--key value`.")
        else:
            flags[key].append(token)
    for key, values in flags.items():
        if not values:
            raise ConfigError(f"--{key} needs a value. Fix: pass `--{key} VALUE`.")
        flags[key] = values[0] if len(values) == 1 else values
    return flags


def plan(ablation: Ablation, overrides: dict, arms: list[str] | None = None,
         seeds: list[int] | None = None) -> list[PlannedRun]:
    """Every run's recipe arguments, each checked by the recipe's own parser (nothing launched)."""
    overrides = _check_flags("command line", "--", overrides)
    for arm in arms or []:
        if arm not in ablation.arms:
            raise ConfigError(f"--arms {arm}: not an arm of {ablation.path}. Fix: use some of "
                              f"{', '.join(ablation.arms)}.")
    runs = []
    for seed in seeds if seeds is not None else ablation.seeds:
        for arm, arm_flags in ablation.arms.items():
            if arms and arm not in arms:
                continue
            out = ablation.output_dir / arm / f"seed{seed}"
            args = ((["--config", ablation.recipe_config] if ablation.recipe_config else [])
                    + to_cli_args({**ablation.recipe, **overrides, **arm_flags})
                    + ["--output_dir", str(out), "--seed", str(seed),
                       "--run_name", f"{arm}-seed{seed}", "--wandb_group", ablation.name,
                       "--wandb_tags", arm, f"seed{seed}"])
            try:
                cfg = parse_config(args)
                check_trackers(cfg.report_to)
            except ConfigError as err:
                fix = "" if "Fix" in str(err) else (" Fix: correct it under `recipe:` or "
                                                    f"`arms: {arm}:` (or on the command line).")
                raise ConfigError(
                    f"{ablation.path}: arm '{arm}' (seed {seed}): {err}{fix}") from err
            runs.append(PlannedRun(arm, seed, out, args, cfg))
    return runs


# ================================================================================ running
def command(ablation: Ablation, run: PlannedRun, launcher: list[str] | None = None) -> list[str]:
    """`accelerate launch ...` for one run; ``launcher`` replaces the `accelerate launch` words."""
    return [*(launcher or ["accelerate", "launch"]), "--config_file", ablation.accelerate_config,
            _display(RECIPE), *run.recipe_args]


def accelerate_launcher() -> list[str]:
    """This environment's `accelerate launch` (the script next to this Python, else the module)."""
    script = Path(sys.executable).with_name("accelerate")
    if script.is_file():
        return [str(script), "launch"]
    return [sys.executable, "-m", "accelerate.commands.launch"]


def config_drift(run: PlannedRun) -> list[str]:
    """Settings where a finished run's config.yaml differs from what the plan would run now
    (keys that do not change the result, such as logging_steps, are not compared)."""
    try:
        saved = read_yaml_mapping(RunFolder(run.output_dir).config, what="run config")
    except ConfigError:
        return ["config.yaml unreadable"]
    return differences(saved, run.config.to_dict())


def write_plan(ablation: Ablation, runs: list[PlannedRun]) -> None:
    """ablation.json: the arms, seeds and run folders, merged with an earlier plan of the folder."""
    path = ablation.output_dir / PLAN_FILE
    old = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
    entries = {(r["arm"], r["seed"]): r for r in old.get("runs", [])}
    for run in runs:
        if (run.arm, run.seed) in entries and RunFolder(run.output_dir).summary.is_file():
            continue  # finished earlier: keep the command that actually ran
        entries[(run.arm, run.seed)] = {
            "arm": run.arm, "seed": run.seed,
            "output_dir": str(run.output_dir.relative_to(ablation.output_dir)),
            "command": shlex.join(command(ablation, run))}
    planned = {arm for arm, _ in entries}  # arms of this and earlier invocations, YAML order first
    arm_order = [a for a in ablation.arms if a in planned] + sorted(planned - set(ablation.arms))
    seeds = sorted({s for _, s in entries})
    data = {"name": ablation.name, "reference": ablation.reference,
            "comparisons": ablation.comparisons, "arms": arm_order,
            "seeds": seeds, "config": ablation.path,
            "runs": sorted(entries.values(), key=lambda r: (r["seed"], arm_order.index(r["arm"])
                                                            if r["arm"] in arm_order else 0))}
    write_json_atomic(path, data)


def launch(ablation: Ablation, run: PlannedRun) -> tuple[int, float]:
    """Run one recipe process, its output appended to <run>/launch.log; (exit code, seconds)."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(ablation, run, accelerate_launcher())
    env = {**os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    with (run.output_dir / "launch.log").open("a") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')}  {shlex.join(cmd)}\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        log.write(f"==== exit {code}\n")
    return code, time.perf_counter() - t0


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ================================================================================ main
def main(argv: list[str] | None = None, default_config: str | None = None,
         prog: str = "recipes/ablate.py") -> int:
    """The runner; ``default_config`` (an ablation YAML in the checkout) makes --config optional."""
    parser = argparse.ArgumentParser(
        prog=f"python {prog}", description=__doc__.split("\n\n")[0],
        epilog="Other --key value flags are recipe flags applied to every arm.",
        allow_abbrev=False)  # --seed must not pass for --seeds (it is a recipe flag, refused)
    parser.add_argument("--config", required=default_config is None,
                        default=default_config and str(ROOT / default_config),
                        help="the ablation YAML, e.g. recipes/configs/ablation_padding.yaml" + (
                            f" (default: {default_config})" if default_config else ""))
    parser.add_argument("--dry_run", action="store_true",
                        help="print one `accelerate launch` command per run still to do; run none")
    parser.add_argument("--accelerate_config", help="override the YAML's accelerate_config")
    parser.add_argument("--output_dir", help="override the YAML's output_dir")
    parser.add_argument("--report_dir", help="write the report (and a copy of the plan, "
                        "ablation.json) here instead of into the output_dir")
    parser.add_argument("--seeds", nargs="+", type=int, help="run these seeds (e.g. --seeds 0 1)")
    parser.add_argument("--arms", nargs="+", help="run only these arms")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        ablation = load_ablation(args.config)
        if args.accelerate_config:
            ablation.accelerate_config = _resolve_file("command line", "--accelerate_config",
                                                       args.accelerate_config)
        if args.output_dir:
            ablation.output_dir = Path(args.output_dir)
        runs = plan(ablation, parse_overrides(rest), args.arms, args.seeds)
    except ConfigError as err:
        print(f"{Path(prog).stem}: error: {err}", file=sys.stderr)
        return 2

    todo = [r for r in runs if not RunFolder(r.output_dir).summary.is_file()]
    done = [r for r in runs if r not in todo]  # finished earlier: skipped
    if args.dry_run:
        for run in done:
            print(f"# {run.label}: finished ({run.output_dir}/summary.json), not listed",
                  file=sys.stderr)
        for run in todo:
            print(shlex.join(command(ablation, run)))
        sys.stdout.flush()
        print(f"# {len(todo)} of {len(runs)} runs to do; W&B group '{ablation.name}'; afterwards: "
              f"python -m mlmkit.report {ablation.output_dir}"
              + (f" --output_dir {args.report_dir}" if args.report_dir else ""), file=sys.stderr)
        return 0

    ablation.output_dir.mkdir(parents=True, exist_ok=True)
    write_plan(ablation, runs)
    print(f"ablation '{ablation.name}': {len(runs)} runs ({len({r.arm for r in runs})} arms x "
          f"{len({r.seed for r in runs})} seeds, {len(done)} finished earlier) in "
          f"{ablation.output_dir}; launch settings {ablation.accelerate_config}", flush=True)
    failed = []
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {run.label}"
        if run in done:
            drift = config_drift(run)
            print(f"{head}: finished earlier, skipped" + (
                f" -- WARNING: its config differs from the plan ({'; '.join(drift)}); delete "
                f"{run.output_dir} to run it again" if drift else ""), flush=True)
            continue
        print(f"{head}: running (log: {run.output_dir / 'launch.log'})", flush=True)
        try:
            code, seconds = launch(ablation, run)
        except KeyboardInterrupt:
            print(f"{head}: interrupted; finished runs are kept, re-run to continue",
                  file=sys.stderr)
            return 130
        summary = RunFolder(run.output_dir).summary
        if code == 0 and summary.is_file():
            loss = json.loads(summary.read_text()).get("eval/loss")
            print(f"{head}: done in {seconds:.0f} s, final eval/loss "
                  f"{loss if loss is None else round(loss, 4)}", flush=True)
        else:
            failed.append(run)
            print(f"{head}: FAILED (exit {code}) after {seconds:.0f} s; last lines of "
                  f"{run.output_dir / 'launch.log'}:\n{tail(run.output_dir / 'launch.log')}",
                  flush=True)

    from mlmkit.report.build import build_report
    try:
        report_dir = Path(args.report_dir or ablation.output_dir)
        numbers = build_report(ablation.output_dir, output_dir=report_dir)
        if args.report_dir:
            shutil.copyfile(ablation.output_dir / PLAN_FILE, report_dir / PLAN_FILE)
        print(f"report: {numbers['n_finished']}/{numbers['n_runs']} runs -> "
              f"{report_dir / 'report.md'} (+ report.json, {len(numbers['plots'])} plots)")
    except Exception as err:  # the runs are done; a report bug must not hide that
        rebuild = f" --output_dir {args.report_dir}" if args.report_dir else ""
        print(f"report FAILED: {err!r}; rebuild with python -m mlmkit.report "
              f"{ablation.output_dir}{rebuild}", file=sys.stderr)
        failed.append(None)
    if failed:
        names = ", ".join(r.label for r in failed if r)
        print(f"{len([r for r in failed if r])} run(s) failed: {names or 'none'}"
              + ("; the report failed" if None in failed else "")
              + ". Re-run the same command to retry only what is missing.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
