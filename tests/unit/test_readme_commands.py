"""tests/readme_commands.py reads what the tests launch from README.md and docs/*.md: one
`accelerate launch` line per accelerate config, the one-GPU lines, the three sbatch lines, and the
CPU note's changes; and every `accelerate launch` or `sbatch` line the README or the docs show is
one that a test runs. (The lines themselves are launched in tests/integration/
test_readme_launches.py, test_distributed.py, test_fsdp.py and test_readme_data_commands.py.)"""

from __future__ import annotations

from helpers import ROOT
from readme_commands import (
    cpu_note,
    launch_lines,
    launches_of,
    readme_launches,
    single_gpu_launches,
)


def test_the_readme_documents_each_launch_and_what_a_cpu_user_changes():
    configs = [launch.config for launch in launches_of("accelerate")]
    assert len(configs) == len(set(configs))  # one line per config
    assert {"cpu", "ddp", "fsdp2", "multi_node", "zero2", "zero3", "zero3_offload"} <= set(configs)
    assert [(launch.config, launch.env) for launch in launches_of("sbatch")] == [
        ("multi_node", {}), ("zero2", {"ACCELERATE_CONFIG": "accelerate_configs/zero2.yaml"}),
        ("zero3", {"ACCELERATE_CONFIG": "accelerate_configs/zero3.yaml"})]
    for launch in readme_launches():
        assert (ROOT / "accelerate_configs" / f"{launch.config}.yaml").is_file(), launch.text
    single = single_gpu_launches()
    assert any("--train_file" in launch.argv for launch in single)  # "your data on one GPU"
    for launch in single:
        assert launch.argv[2:6] == ["--num_processes", "1", "--mixed_precision", "bf16"]
    note = cpu_note()
    assert note.accelerate[:2] == ["--num_processes", "2"]
    assert note.single == ["--mixed_precision", "no"]
    assert note.sbatch == ["--gpus-per-node=0", "--cpus-per-task=1"]
    assert note.env == {"MIXED_PRECISION": "no"}


# The recipe flags that make a line one of the large-corpora page's commands, which
# tests/integration/test_readme_data_commands.py runs, or the downstream page's, which
# tests/unit/test_recipe.py runs in process.
DATA_LINES = ("--streaming", "--tokenized_dir", "--probe_file")
# The recipe page's lines (their first two recipe flags), which tests/unit/test_recipe_page.py
# runs in process: the second phase of a context extension and the starting config.
RECIPE_PAGE_LINES = (("--model_name_or_path", "outputs/phase1/model"),
                     ("--config", "recipes/configs/modernbert_style.yaml"))


def test_every_launch_the_docs_show_is_one_a_test_runs():
    """A new `accelerate launch` or `sbatch` line in the README or the docs must be of a kind
    the launch tests read: with an accelerate config (test_distributed.py, test_fsdp.py,
    test_readme_launches.py), the one-GPU form (test_readme_launches.py), sbatch (the Slurm
    tests) or one of the large-corpora commands (test_readme_data_commands.py)."""
    known = {launch.text for launch in readme_launches() + single_gpu_launches()}
    for launch in launch_lines():
        data = launch.kind == "single" and launch.argv[2:3] == ["recipes/mlm.py"] and \
            launch.argv[3:4] and (launch.argv[3] in DATA_LINES or
                                  tuple(launch.argv[3:5]) in RECIPE_PAGE_LINES)
        assert launch.text in known or data, f"no test runs this documented launch: {launch.text}"
