"""recipes/ablate.py's main() in this process: a bad ablation YAML fails before anything is
launched, naming the key and the fix; --dry_run prints one copy-pasteable launch per arm x seed
and writes nothing; the committed recipe ablation and recipes/ablate_padding.py, dry. Ablations
run end to end (launches, W&B, the report): tests/integration/test_ablation.py."""

from __future__ import annotations

import importlib.util
import re
import runpy
import shlex
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, SENTENCES, load_script, run_recipe

from mlmkit.data.corpora import LEE_MEMBER
from mlmkit.data.corpora import main as corpora_main
from mlmkit.data.probe_file import write_probe_file

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
    start = next(i for i, token in enumerate(argv) if token.endswith("recipes/mlm.py"))
    for token in argv[start + 1:]:
        if token.startswith("--"):
            key = token[2:]
            flags[key] = ""
        else:
            flags[key] = f"{flags[key]} {token}".strip()
    return flags


def test_the_recipe_ablation_as_make_runs_it(checkout, capsys):
    """`make ablation-recipe`'s command, dry: 3 seeds x {classic, modern}, every flag of the
    2024-26 recipe accepted by the recipe's parser, both arms evaluated at 15% masking."""
    _, (recipe,) = make_recipe("ablation-recipe")
    argv, out = dry_run_of(recipe, capsys)
    assert argv == ["--config", "recipes/configs/ablation_recipe.yaml", "--report_dir",
                    "docs/ablation/recipe"]
    lines = out.out.splitlines()
    assert [flags_of(line)["run_name"] for line in lines] == [
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


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A working folder like the checkout after `make probe-data`: recipes/ and
    accelerate_configs/ linked, probes/ablation/ with small probe files of the real names (the
    ablation configs probe them), the current folder."""
    for name in ("recipes", "accelerate_configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "probes" / "ablation").mkdir(parents=True)
    for name in ("movies", "tweets"):
        write_probe_file(tmp_path / "probes" / "ablation" / f"{name}.tsv",
                         [(f"{name} text {i}", "ab"[i % 2]) for i in range(20)])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_recipe(target: str) -> tuple[list[str], list[str]]:
    """A Makefile target's prerequisites and its command lines (continuations joined)."""
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    (found,) = re.findall(rf"^{re.escape(target)}:(.*)\n((?:\t.*\n)+)", makefile, flags=re.M)
    return found[0].split(), [" ".join(line.split()) for line in found[1].splitlines()]


def make_variable(name: str) -> str:
    (value,) = re.findall(rf"^{name}\s*[:?]?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    return value


def dry_run_of(command: str, capsys):
    """A Makefile command line's runner flags (after recipes/ablate.py, without $(ARGS)), and
    what the runner prints for them with --dry_run."""
    argv = shlex.split(command.split("recipes/ablate.py", 1)[1].replace("$(ARGS)", ""))
    assert load_script(RUNNER).main([*argv, "--dry_run"]) == 0
    return argv, capsys.readouterr()


@pytest.mark.parametrize("config", ["ablation_padding", "ablation_scratch_bert",
                                    "ablation_scratch_roberta"])
def test_the_padding_regimes_probe_downstream(checkout, capsys, config):
    """Every padding regime's runs log the downstream measures: both sentiment probes of
    `make probe-data`'s samples and the pseudo-perplexity; the arms trained without the mask are
    also probed without it; `make`'s target writes the probes first."""
    ablate = load_script(RUNNER)
    assert ablate.main(["--config", f"recipes/configs/{config}.yaml", "--seeds", "0",
                        "--dry_run"]) == 0
    for line in capsys.readouterr().out.splitlines():
        flags = flags_of(line)
        arm = flags["run_name"].split("-seed")[0]
        assert flags["probe_file"] == "probes/ablation/movies.tsv probes/ablation/tweets.tsv"
        assert int(flags["pseudo_perplexity_examples"]) > 0
        unmasked = flags["mask_padding"] == "false"
        assert (flags.get("probe_mask_padding") == "both") is unmasked, arm
    target = "ablation" if config == "ablation_padding" else "ablation-scratch-bert"
    (rule,) = [line for line in (ROOT / "Makefile").read_text().splitlines()
               if re.match(rf"^{target}[ :]", line)]
    assert "probe-data" in rule.split(":")[-1].split()


def test_the_trained_head_regime_as_make_runs_it(checkout, capsys):
    """`make ablation-trained-head`'s commands as written, tiny: the corpus from a small wheel,
    phase 1 (a few steps of the tiny BERT; skipped once its model/ exists), then the four padding
    arms x 3 seeds, dry, continuing from phase 1's model/ with the probes, the report to
    docs/ablation/trained_head."""
    prerequisites, (phase1, phase2) = make_recipe("ablation-trained-head")
    assert {"probe-data", "corpora"} <= set(prerequisites)
    _, (_, corpora) = make_recipe("corpora")
    base = make_variable("TRAINED_HEAD_BASE")
    assert base == "outputs/ablation_trained_head/base"

    # the corpus: `make corpora`'s command on a wheel of gensim's layout
    cache = checkout / make_variable("CORPUS_CACHE")
    cache.mkdir(parents=True)
    with zipfile.ZipFile(cache / "gensim-4.4.0-py3-none-any.whl", "w") as z:
        z.writestr(LEE_MEMBER, "\n".join(" ".join(SENTENCES) for _ in range(40)))
    argv = shlex.split(corpora.replace("$(CORPUS_CACHE)", str(cache)))
    assert argv[1:3] == ["-m", "mlmkit.data.corpora"]
    assert corpora_main(argv[3:]) and (checkout / "corpora" / "lee_background.txt").is_file()
    assert "lee_background.txt: 40 documents" in capsys.readouterr().out

    # phase 1, once: skipped when its model/ exists
    skip, launch = phase1.split(" || ")
    assert skip == "test -f $(TRAINED_HEAD_BASE)/model/config.json"
    args = shlex.split(launch.split("recipes/mlm.py", 1)[1])
    assert args == ["--config", "recipes/configs/ablation_trained_head_base.yaml"]
    base_config = yaml.safe_load((ROOT / args[1]).read_text())
    assert base_config["output_dir"] == base and base_config["train_file"] == \
        "corpora/lee_background.txt"
    tiny = ["--config_name", "recipes/configs/models/bert-4x256", "--max_train_steps", "2",
            "--eval_steps", "2", "--per_device_train_batch_size", "2", "--max_eval_samples", "4"]
    run_recipe([*args, *tiny])
    assert (checkout / base / "model" / "config.json").is_file()
    capsys.readouterr()  # the run's own lines

    # phase 2: the padding arms from phase 1's model, dry
    argv, out = dry_run_of(phase2, capsys)
    assert argv == ["--config", "recipes/configs/ablation_trained_head.yaml", "--report_dir",
                    "docs/ablation/trained_head"]
    lines = out.out.splitlines()
    assert [flags_of(line)["run_name"] for line in lines] == [
        f"{arm}-seed{seed}" for seed in range(3)
        for arm in ("masked", "unmasked", "packed", "packed_naive")]
    for line in lines:
        flags = flags_of(line)
        assert flags["model_name_or_path"] == f"{base}/model"
        assert flags["probe_file"] == "probes/ablation/movies.tsv probes/ablation/tweets.tsv"
    assert "--output_dir docs/ablation/trained_head" in out.err


def test_ablate_padding_runs_the_padding_ablation(checkout, monkeypatch, capsys):
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


def test_every_documented_runner_command_runs(checkout, capsys):
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
