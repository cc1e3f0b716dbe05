"""mlmkit.train.average: the float32 mean of saved weights, read from checkpoints and model
folders, written as an HF model folder in the model's dtype; the command's one-line refusals;
--average_checkpoints refused at start where the run would have too few checkpoints. A run
that writes model_avg/ and its eval: tests/unit/test_recipe.py (one process), the FSDP2 launch
(tests/integration/test_fsdp.py: sharded checkpoints)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_model
from safetensors.torch import load_file, save_file

from mlmkit.config.errors import ConfigError
from mlmkit.config.parse import parse_config
from mlmkit.train import average
from mlmkit.train.checkpoint import write_marker
from mlmkit.train.tracking import read_metrics


def test_mean_is_exact_in_float32_key_by_key():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "n": torch.tensor([3])}
    b = {"w": torch.tensor([2.0, 4.0], dtype=torch.bfloat16), "n": torch.tensor([5])}
    c = {"w": torch.tensor([4.0, 7.0], dtype=torch.bfloat16), "n": torch.tensor([7])}
    mean = average.mean_state_dict([a, b, c])
    assert mean.keys() == {"w"}  # integer buffers are not averaged
    assert mean["w"].dtype == torch.float32
    assert torch.equal(mean["w"], torch.tensor([7 / 3, 13 / 3], dtype=torch.float32))
    # 2 sources: the plain midpoint, exactly
    assert torch.equal(average.mean_state_dict([a, b])["w"], torch.tensor([1.5, 3.0]))


def test_mean_refuses_other_tensors_or_shapes():
    a = {"w": torch.zeros(2)}
    with pytest.raises(ConfigError, match="different tensors"):
        average.mean_state_dict([a, {"v": torch.zeros(2)}])
    with pytest.raises(ConfigError, match=r"shape \[3\] here"):
        average.mean_state_dict([a, {"w": torch.zeros(3)}])


def _checkpoint(folder, model, step: int):
    """A checkpoint as one process saves it: the training module's weights (``model.`` prefix,
    Accelerate's safetensors without the tied decoder) and the completion marker."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    state = {f"model.{k}": v.clone().contiguous() for k, v in model.state_dict().items()
             if k != "cls.predictions.decoder.weight"}
    save_file(state, path / "model.safetensors")
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    write_marker(path, step)
    return path


@pytest.fixture
def three_models(tmp_path, tokenizer_path):
    """Three tiny BERTs with different weights: a model folder (bf16, with the tokenizer) and two
    checkpoints of a run whose model/ it is."""
    from transformers import AutoTokenizer
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = tiny_model("bert")
        for p in model.parameters():
            p.data.normal_()
        models.append(model)
    run = tmp_path / "run"
    final = run / "model"
    models[0].to(torch.bfloat16).save_pretrained(final)
    models[0].float()
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(final)
    ckpts = [_checkpoint(run / "checkpoints", m, step) for m, step in ((models[1], 2),
                                                                         (models[2], 4))]
    return models, final, ckpts


def test_average_folders_writes_the_mean_in_the_models_dtype(tmp_path, three_models):
    models, final, ckpts = three_models
    out = average.average_folders(tmp_path / "avg", [final, *ckpts], like=final)
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    saved = load_file(out / "model.safetensors")
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.bfloat16}
    # the mean of the bf16 final weights and the fp32 checkpoints, taken in fp32, then rounded
    key = "bert.encoder.layer.0.attention.self.query.weight"
    sources = [models[0].to(torch.bfloat16).float().state_dict()[key],
               models[1].state_dict()[key], models[2].state_dict()[key]]
    models[0].float()
    expected = ((sources[0] + sources[1] + sources[2]) / 3).to(torch.bfloat16)
    assert torch.equal(saved[key], expected)
    loaded = AutoModelForMaskedLM.from_pretrained(out)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert len(AutoTokenizer.from_pretrained(out)) == 30522  # the tokenizer came along
    assert not (tmp_path / "avg.tmp").exists()


def test_the_command_averages_checkpoints_with_the_runs_config(tmp_path, three_models):
    models, final, ckpts = three_models
    out = tmp_path / "avg"
    assert average.main([str(a) for a in (out, *ckpts)]) == 0  # config: the run's model/
    key = "bert.embeddings.word_embeddings.weight"
    mean = (models[1].state_dict()[key] + models[2].state_dict()[key]) / 2
    assert torch.equal(load_file(out / "model.safetensors")[key], mean.to(torch.bfloat16))


@pytest.mark.parametrize("case, fix", [
    ("one", "at least 2"),
    ("exists", "pass a new folder"),
    ("missing", "no such folder"),
    ("incomplete", "not a complete checkpoint"),
    ("no_config", "--config_from"),
    ("other_model", "--config_from"),
])
def test_the_commands_mistakes_are_one_line(tmp_path, three_models, capsys, case, fix):
    models, final, ckpts = three_models
    out = tmp_path / "avg"
    argv = [out, *ckpts]
    if case == "one":
        argv = [out, ckpts[0]]
    elif case == "exists":
        out.mkdir()
        (out / "x").write_text("x")
    elif case == "missing":
        argv = [out, ckpts[0], tmp_path / "nope"]
    elif case == "incomplete":
        (ckpts[1] / "COMPLETE").unlink()
    elif case == "no_config":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        argv = [out, *(ckpts[0].rename(elsewhere / ckpts[0].name), ckpts[1])]
        (final / "config.json").unlink()
    elif case == "other_model":
        other = tmp_path / "other"
        tiny_model("bert", hidden_size=64, intermediate_size=128).save_pretrained(other)
        argv = [out, *ckpts, "--config_from", other]
    capsys.readouterr()
    assert average.main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlmkit: error: "), lines
    assert fix in lines[0] and "Fix:" in lines[0]
    assert not out.exists() or case == "exists"
    assert not (tmp_path / "avg.tmp").exists()


@pytest.mark.parametrize("flags, fix", [
    (["--average_checkpoints", "1"], "--average_checkpoints 2 or more"),
    (["--average_checkpoints", "3"], "add --checkpointing_steps"),
    (["--average_checkpoints", "3", "--checkpointing_steps", "5", "--save_total_limit", "2"],
     "--save_total_limit 3 or more"),
    (["--average_checkpoints", "3", "--checkpointing_steps", "5", "--max_train_steps", "10"],
     "--checkpointing_steps 4 or less"),
])
def test_too_few_checkpoints_are_refused_at_start(flags, fix):
    with pytest.raises(ConfigError, match="Fix:") as err:
        parse_config(["--report_to", "none", *flags])
    assert fix in str(err.value) and "\n" not in str(err.value)


def test_an_epoch_run_too_short_for_the_average_is_refused_at_its_schedule():
    cfg = parse_config(["--report_to", "none", "--average_checkpoints", "3",
                        "--checkpointing_steps", "4"])
    average.check_schedule(cfg, 9)  # checkpoints 4 and 8 before step 9
    with pytest.raises(ConfigError, match="--checkpointing_steps 3 or less"):
        average.check_schedule(cfg, 8)  # only checkpoint 4 before the last step


def test_a_run_writes_model_avg_and_its_eval_beside_the_final_models(tmp_path, tiny_args):
    """6 steps, a checkpoint every 2, --average_checkpoints 3: model_avg/ is the mean of the final
    weights (model/) and checkpoints 2 and 4 (checkpoint-6 holds the final weights), a model
    folder like model/, and eval/avg_loss is its loss on the final eval's masks."""
    from helpers import exported_eval_loss, run_recipe

    from mlmkit.train import tracking as M
    out = tmp_path / "run"
    run = run_recipe([*tiny_args, "--output_dir", out, "--max_train_steps", "6",
                      "--learning_rate", "3e-3", "--max_train_samples", "200",
                      "--checkpointing_steps", "2", "--average_checkpoints", "3"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary[M.AVERAGED_CHECKPOINTS] == [2, 4, 6]
    assert "model_avg/: the final weights and checkpoints 2, 4 averaged" in run.stdout
    assert summary[M.EVAL_AVG_LOSS] != summary[M.EVAL_LOSS]
    assert summary[M.EVAL_AVG_PERPLEXITY] == pytest.approx(math.exp(summary[M.EVAL_AVG_LOSS]))
    logged = [r for r in read_metrics(out) if M.EVAL_AVG_LOSS in r]
    assert [(r[M.STEP], r[M.EVAL_AVG_LOSS]) for r in logged] == [(6, summary[M.EVAL_AVG_LOSS])]
    # the same fixed eval masks as model/'s eval: re-evaluated here, the same loss
    assert exported_eval_loss(out, "model_avg") == pytest.approx(summary[M.EVAL_AVG_LOSS],
                                                                 rel=1e-5)
    # the weights are the mean of the three
    avg = load_file(out / "model_avg" / "model.safetensors")
    sources = [average.read_weights(p) for p in (out / "model", out / "checkpoints/checkpoint-2",
                                                 out / "checkpoints/checkpoint-4")]
    key = "bert.encoder.layer.1.output.dense.weight"
    assert torch.allclose(avg[key], sum(s[key] for s in sources) / 3, atol=1e-7)
    assert not torch.equal(avg[key], sources[0][key])
    assert sorted(p.name for p in (out / "model_avg").iterdir()) == sorted(
        p.name for p in (out / "model").iterdir())  # config, weights, tokenizer: as model/


def test_the_docs_command_averages_a_runs_checkpoints_and_model(tmp_path, three_models,
                                                               monkeypatch):
    """docs/recipe.md's `python -m mlmkit.train.average` line as written, on a run folder laid
    out as its paths say (outputs/mlm: checkpoints 2000 and 3000, model/)."""
    from readme_commands import readme_lines
    (line,) = readme_lines("python -m mlmkit.train.average")
    models, final, ckpts = three_models
    run = tmp_path / "outputs" / "mlm"
    run.parent.mkdir()
    (tmp_path / "run").rename(run)
    for old, step in zip(ckpts, (2000, 3000)):
        (run / "checkpoints" / old.name).rename(run / "checkpoints" / f"checkpoint-{step}")
    monkeypatch.chdir(tmp_path)
    assert average.main(line[3:]) == 0
    key = "bert.encoder.layer.0.output.dense.weight"
    mean = (models[1].state_dict()[key] + models[2].state_dict()[key] +
            models[0].to(torch.bfloat16).float().state_dict()[key]) / 3
    assert torch.equal(load_file(run / "model_avg" / "model.safetensors")[key],
                       mean.to(torch.bfloat16))
