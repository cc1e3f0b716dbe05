"""`distributed.build_accelerator`: what it hands Accelerate for every launch (here one CPU
process; the multi-process engines are launched for real in tests/integration)."""

from __future__ import annotations

import datetime

from mlmkit.config import parse_config
from mlmkit.distributed import build_accelerator


def test_ddp_timeout_is_the_process_group_timeout():
    """--ddp_timeout reaches init_process_group's kwargs (DeepSpeed's init_distributed gets the
    same kwargs from Accelerate), so a long tokenization on one process does not time out the
    others' barrier."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    cfg = parse_config(["--ddp_timeout", "7200", "--report_to", "none"])
    accelerator = build_accelerator(cfg, [])
    assert accelerator.init_handler.to_kwargs()["timeout"] == datetime.timedelta(seconds=7200)
    AcceleratorState._reset_state(True)
