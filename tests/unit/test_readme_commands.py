"""tests/readme_commands.py reads what the tests launch from README.md: one `accelerate launch`
line per accelerate config, the two sbatch lines, and the CPU note's changes. (The lines
themselves are launched in tests/integration/test_readme_launches.py, test_distributed.py and
test_fsdp.py.)"""

from __future__ import annotations

from helpers import ROOT
from readme_commands import cpu_note, launches_of, readme_launches


def test_the_readme_documents_each_launch_and_what_a_cpu_user_changes():
    configs = [launch.config for launch in launches_of("accelerate")]
    assert len(configs) == len(set(configs))  # one line per config
    assert {"ddp", "fsdp2", "multi_node", "zero2", "zero3", "zero3_offload"} <= set(configs)
    assert [(launch.config, launch.env) for launch in launches_of("sbatch")] == [
        ("multi_node", {}), ("zero3", {"ACCELERATE_CONFIG": "accelerate_configs/zero3.yaml"})]
    for launch in readme_launches():
        assert (ROOT / "accelerate_configs" / f"{launch.config}.yaml").is_file(), launch.text
    note = cpu_note()
    assert note.accelerate[:2] == ["--num_processes", "2"]
    assert note.sbatch == ["--gpus-per-node=0", "--cpus-per-task=1"]
    assert note.env == {"MIXED_PRECISION": "no"}
