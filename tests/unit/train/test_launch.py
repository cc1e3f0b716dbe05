"""distributed.py without processes: what `build_accelerator` hands Accelerate (here one CPU
process), FSDP2's layer units, and `check_launch`. The engines themselves (DDP, ZeRO-2/3, FSDP2,
2 nodes) are launched for real in tests/integration/test_distributed.py and test_fsdp.py."""

from __future__ import annotations

import datetime
import types

import pytest
from helpers import tiny_model

from mlmkit.config.errors import ConfigError
from mlmkit.config.parse import parse_config
from mlmkit.train import checkpoint as C
from mlmkit.train.launch import build_accelerator, check_launch, launch_signature


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


def test_layer_units_keep_the_tied_embeddings_together():
    """Each BertLayer is an FSDP2 unit of its own; BertEmbeddings (BERT's _no_split_modules lists
    it) is not, since it holds the word embeddings that the MLM decoder is tied to."""
    from mlmkit.model.loading import MaskedLMModule
    from mlmkit.train.launch import fsdp_layer_classes

    model = tiny_model("bert")
    assert set(model._no_split_modules) == {"BertEmbeddings", "BertLayer"}
    assert fsdp_layer_classes(MaskedLMModule(model)) == ["BertLayer"]


def test_check_launch_refuses_another_process_count(tmp_path):
    accelerator = types.SimpleNamespace(num_processes=1, distributed_type="NO")
    state = C.TrainState(launch={"num_processes": 2, "distributed_type": "MULTI_CPU"})
    with pytest.raises(ConfigError, match="num_processes"):
        check_launch(state.launch, tmp_path, accelerator)
    check_launch(launch_signature(accelerator), tmp_path, accelerator)


def test_zero_note_only_for_one_gpu_process_under_deepspeed():
    """ZeRO shards nothing on one process: the recipe says so on a GPU; DDP, several processes
    and CPU runs get no note."""
    from types import SimpleNamespace

    import torch

    from mlmkit.train.launch import zero_note

    def launched(stage, processes, device):
        plugin = None if stage is None else SimpleNamespace(zero_stage=stage)
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin),
                               num_processes=processes, device=torch.device(device))
    note = zero_note(launched(2, 1, "cuda"))
    assert note.startswith("one GPU under DeepSpeed ZeRO-2") and "ddp.yaml" in note
    assert "ZeRO-3" in zero_note(launched(3, 1, "cuda"))
    assert zero_note(launched(None, 1, "cuda")) is None
    assert zero_note(launched(2, 8, "cuda")) is None
    assert zero_note(launched(2, 1, "cpu")) is None
