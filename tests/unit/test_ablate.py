"""recipes/ablate_padding.py's main() in this process: a bad ablation YAML fails before anything
is launched, naming the key and the fix; --dry_run prints one copy-pasteable launch per arm x
seed and writes nothing. The ablation run end to end (launches, W&B, the report):
tests/integration/test_ablation.py."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

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
