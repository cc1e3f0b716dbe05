"""recipes/ablate.py's main() in this process: a bad ablation YAML fails before anything is
launched, naming the key and the fix; --dry_run prints one copy-pasteable launch per arm x seed
and writes nothing; the committed recipe ablation and recipes/ablate_padding.py, dry. Ablations
run end to end (launches, W&B, the report): tests/integration/test_ablation.py."""

from __future__ import annotations

import importlib.util
import re
import runpy
import shlex
import tempfile
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, load_script

RUNNER = ROOT / "recipes" / "ablate.py"


def test_bad_ablation_yaml_fails_before_launching(tmp_path, ablation_yaml, capsys):
    spec = yaml.safe_load(ablation_yaml.read_text())
    cases = [
        ({"arms": {**spec["arms"], "unmasked": {"mask_paddin": False}}},
         "arms.unmasked.mask_paddin", "did you mean 'mask_padding'"),
        ({"seed": 3}, "seed: unknown key", "did you mean 'seeds'"),
        ({"recipe": {**spec["recipe"], "learning_rate": "fast"}}, "arm 'masked'", "learning_rate"),
        ({"recipe": {**spec["recipe"], "wandb_group": "x"}}, "recipe.wandb_group",
         "`name:` in the ablation YAML"),
        ({"reference": "packed"}, "reference", "use one of masked, unmasked, broken"),
    ]
    if importlib.util.find_spec("trackio") is None:
        cases.append(({"recipe": {**spec["recipe"], "report_to": "trackio"}}, "report_to",
                      "pip install trackio"))
    main = load_script(RUNNER).main
    for change, where, fix in cases:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**spec, **change}, sort_keys=False))
        assert main(["--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert where in err and fix in err and "Fix" in err, err
    assert not Path(spec["output_dir"]).exists()


def test_dry_run_prints_one_launch_per_run(ablation_yaml, capsys):
    spec = yaml.safe_load(ablation_yaml.read_text())
    main = load_script(RUNNER).main
    assert main(["--config", str(ablation_yaml), "--dry_run", "--seeds", "0", "1",
                 "--max_train_steps", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 * 2
    for line, (seed, arm) in zip(lines, [(s, a) for s in (0, 1) for a in spec["arms"]]):
        argv = shlex.split(line)
        assert argv[:5] == ["accelerate", "launch", "--config_file", spec["accelerate_config"],
                            "recipes/mlm.py"]
        flags = " ".join(argv[5:])
        assert f"--output_dir {spec['output_dir']}/{arm}/seed{seed}" in flags
        assert f"--seed {seed} --run_name {arm}-seed{seed} --wandb_group abl-test " \
               f"--wandb_tags {arm} seed{seed}" in flags
        assert "--max_train_steps 3" in flags  # a command-line recipe flag reaches every arm
    assert "--mask_padding false" in lines[1] and "--mask_padding true" in lines[0]
    assert not Path(spec["output_dir"]).exists()  # nothing launched, nothing written


def flags_of(line: str) -> dict[str, str]:
    """A printed launch's recipe flags after recipes/mlm.py: {name: value} (lists joined)."""
    argv = shlex.split(line)
    flags, key = {}, None
    for token in argv[argv.index("recipes/mlm.py") + 1:]:
        if token.startswith("--"):
            key = token[2:]
            flags[key] = ""
        else:
            flags[key] = f"{flags[key]} {token}".strip()
    return flags


def test_the_recipe_ablation_as_make_runs_it(capsys):
    """`make ablation-recipe`'s command, dry: 3 seeds x {classic, modern}, every flag of the
    2024-26 recipe accepted by the recipe's parser, both arms evaluated at 15% masking."""
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    (recipe,) = re.findall(r"^ablation-recipe:.*\n\t(.*)$", makefile, flags=re.M)
    argv = shlex.split(recipe.split("recipes/ablate.py", 1)[1].replace("$(ARGS)", ""))
    assert argv == ["--config", "recipes/configs/ablation_recipe.yaml", "--report_dir",
                    "docs/ablation/recipe"]
    assert load_script(RUNNER).main([*argv, "--dry_run"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert [shlex.split(line)[shlex.split(line).index("--run_name") + 1] for line in lines] == [
        f"{arm}-seed{seed}" for seed in range(3) for arm in ("classic", "modern")]
    for line in lines:
        assert "--config recipes/configs/scratch.yaml --config_name " \
               "recipes/configs/models/bert-4x256 --eval_mlm_probability 0.15" in line
    classic, modern = (flags_of(line) for line in lines[:2])
    assert {k: classic[k] for k in ("mlm_probability", "optimizer", "lr_scheduler_type",
                                    "padding", "eval_mlm_probability")} == {
        "mlm_probability": "0.15", "optimizer": "adamw", "lr_scheduler_type": "linear",
        "padding": "longest", "eval_mlm_probability": "0.15"}
    assert {k: modern[k] for k in ("mlm_probability", "mlm_probability_final", "optimizer",
                                   "lr_scheduler_type", "lr_decay_type", "padding",
                                   "eval_mlm_probability")} == {
        "mlm_probability": "0.3", "mlm_probability_final": "0.15", "optimizer": "stable_adamw",
        "lr_scheduler_type": "warmup_stable_decay", "lr_decay_type": "1-sqrt",
        "padding": "packed", "eval_mlm_probability": "0.15"}
    assert int(modern["batch_warmup_steps"]) > 0 and int(modern["average_checkpoints"]) >= 2
    assert "python -m mlmkit.report outputs/ablation_recipe --output_dir docs/ablation/recipe" \
        in out.err


def test_ablate_padding_runs_the_padding_ablation(monkeypatch, capsys):
    """`python recipes/ablate_padding.py` is recipes/ablate.py with the padding config."""
    monkeypatch.setattr(sys, "argv", ["recipes/ablate_padding.py", "--dry_run", "--seeds", "0"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "recipes" / "ablate_padding.py"), run_name="__main__")
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [shlex.split(line)[shlex.split(line).index("--output_dir") + 1] for line in lines] == [
        f"outputs/ablation_padding/{arm}/seed0"
        for arm in ("masked", "unmasked", "packed", "packed_naive")]


def write_yaml(text: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    return f.name


def documented_runner_lines() -> list[str]:
    """Every `python recipes/ablate*.py ...` line of the README's and the docs' shell blocks
    (`make` lines' `# = python ...` comments included), without its trailing comment."""
    lines = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                command = line.split("# = ", 1)[-1].split("  #", 1)[0].strip()
                if command.startswith("python recipes/ablate"):
                    lines.append(command)
    return lines


def test_every_documented_runner_command_runs(capsys):
    """The runner lines the docs show, as written (those that launch, dry: the launches are
    tests/integration/test_ablation.py's), and the docs' example ablation YAML plans."""
    lines = documented_runner_lines()
    assert "python recipes/ablate.py --config recipes/configs/ablation_recipe.yaml --dry_run" \
        in lines and len(lines) >= 4
    for line in lines:
        argv = shlex.split(line)
        main = load_script(ROOT / argv[1]).main
        assert main([*argv[2:], *([] if "--dry_run" in argv else ["--dry_run"])]) == 0, line
        assert capsys.readouterr().out.startswith("accelerate launch --config_file"), line

    page = (ROOT / "docs" / "padding-ablation.md").read_text()
    (example,) = [b for b in re.findall(r"```yaml\n(.*?)```", page, flags=re.S) if "arms:" in b]
    ablate = load_script(RUNNER)
    spec = ablate.load_ablation(write_yaml(example))
    runs = ablate.plan(spec, {})
    assert [r.label for r in runs[:2]] == ["classic-seed0", "modern-seed0"] and len(runs) == 6
    assert runs[1].config.mlm_probability_final == 0.15
