"""The ablation report on synthetic run folders: paired differences and t-intervals checked against
hand-computed values, unfinished and broken runs reported rather than crashing."""

from __future__ import annotations

import json
import math
import shlex

import pytest
import yaml
from helpers import ROOT

from mlmkit.report import across as A
from mlmkit.report import build as R
from mlmkit.report import stats as S
from mlmkit.report.render import PLOTS, render_markdown
from mlmkit.report.runs import PLAN_FILE
from mlmkit.train import tracking as M

# Final eval losses per arm and seed. Hand computation of the paired differences vs `masked`:
#   unmasked: d = (0.05, 0.10, 0.08); mean = 0.23/3 = 0.0766667
#             deviations (-0.0266667, +0.0233333, +0.0033333); sum of squares = 0.00126667
#             sd = sqrt(0.00126667 / 2) = 0.0251661; se = sd / sqrt(3) = 0.0145297
#             t(0.975, 2) = 4.302653 -> half-width 0.0625160 -> CI [0.0141507, 0.1391826]
#   packed:   seeds 0, 1 only (seed 2 failed): d = (0.01, -0.02); mean = -0.005
#             sd = 0.03 / sqrt(2) = 0.0212132; se = 0.015; t(0.975, 1) = 12.706205
#             -> half-width 0.1905931 -> CI [-0.1955931, 0.1855931]
#   packed_naive: seed 0 only (seed 1 never started) -> n = 1, no interval
LOSSES = {
    "masked": {0: 3.00, 1: 3.10, 2: 2.90},
    "unmasked": {0: 3.05, 1: 3.20, 2: 2.98},
    "packed": {0: 3.01, 1: 3.08},
    "packed_naive": {0: 3.20},
}
ARM_FLAGS = {"masked": {"padding": "longest", "mask_padding": True},
             "unmasked": {"padding": "longest", "mask_padding": False},
             "packed": {"padding": "packed", "mask_padding": True},
             "packed_naive": {"padding": "packed", "mask_padding": False}}


def write_run(folder, arm, seed, final_loss=None, *, rate=1000.0, pad=0.5, finished=True,
              flags=None):
    """A run folder as the recipe leaves it: config.yaml, metrics.jsonl, summary.json; the arm's
    recipe flags are ``flags``, else the padding arm's."""
    folder.mkdir(parents=True)
    config = {"seed": seed, "learning_rate": 1e-4, "wandb_group": "abl",
              "wandb_tags": [arm, f"seed{seed}"], "output_dir": str(folder),
              **(ARM_FLAGS[arm] if flags is None else flags)}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{M.STEP: 0, M.EVAL_LOSS: 10.0}]
    for step in (5, 10):
        records.append({M.STEP: step, M.TRAIN_LOSS: 5.0, M.EPOCH: step / 10,
                        M.TRAIN_REAL_TOKENS_PER_S: rate + step, M.TRAIN_PAD_FRACTION: pad})
        if finished:
            records.append({M.STEP: step, M.EVAL_LOSS: final_loss + (10 - step) / 10})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        summary = {M.EVAL_LOSS: final_loss, M.EVAL_PERPLEXITY: math.exp(final_loss),
                   M.EVAL_LOSS_UNMASKED: final_loss + 0.5, M.EVAL_PAD_SENSITIVITY: 0.1,
                   M.TRAIN_RUNTIME: 100.0, M.STEP: 10}
        (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def ablation(tmp_path):
    root = tmp_path / "abl"
    for arm, per_seed in LOSSES.items():
        for seed, loss in per_seed.items():
            write_run(root / arm / f"seed{seed}", arm, seed, loss,
                      rate=3000.0 if arm.startswith("packed") else 1000.0,
                      pad=0.01 if arm.startswith("packed") else 0.5)
    write_run(root / "packed" / "seed2", "packed", 2, finished=False)  # failed mid-run
    (root / "packed" / "seed2" / "launch.log").write_text("Traceback ...\n")
    plan = {"name": "abl", "reference": "masked", "arms": list(LOSSES), "seeds": [0, 1, 2],
            "comparisons": [["unmasked", "packed"]],
            "runs": [{"arm": a, "seed": s, "output_dir": f"{a}/seed{s}"}
                     for s in (0, 1, 2) for a in LOSSES]}
    (root / PLAN_FILE).write_text(json.dumps(plan))
    return root


def test_t_quantiles():
    assert S.t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert S.t_quantile_975(2) == pytest.approx(4.3027, abs=1e-4)
    assert S.t_quantile_975(10) == pytest.approx(2.2281, abs=1e-4)
    assert S.t_quantile_975(120) == pytest.approx(1.9799, abs=1e-4)
    with pytest.raises(ValueError):
        S.t_quantile_975(0)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in range(1, 200):
        assert S.t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-5)


def test_paired_difference_by_hand():
    d = S.paired_difference(LOSSES["unmasked"], LOSSES["masked"])
    assert d["n"] == 3
    assert d["per_seed"] == pytest.approx({"0": 0.05, "1": 0.10, "2": 0.08})
    assert d["mean"] == pytest.approx(0.0766667, abs=1e-6)
    assert d["sd"] == pytest.approx(0.0251661, abs=1e-6)
    assert d["se"] == pytest.approx(0.0145297, abs=1e-6)
    assert d["ci95"] == pytest.approx([0.0141507, 0.1391826], abs=1e-6)

    d = S.paired_difference(LOSSES["packed"], LOSSES["masked"])  # only the shared seeds pair
    assert d["n"] == 2 and d["mean"] == pytest.approx(-0.005)
    assert d["ci95"] == pytest.approx([-0.1955931, 0.1855931], abs=1e-6)

    d = S.paired_difference(LOSSES["packed_naive"], LOSSES["masked"])
    assert d["n"] == 1 and d["mean"] == pytest.approx(0.20) and d["ci95"] is None
    assert S.paired_difference({}, LOSSES["masked"])["n"] == 0


def test_report_from_run_folders(ablation):
    numbers = R.build_report(ablation)
    arms = numbers["arms"]
    assert list(arms) == ["masked", "unmasked", "packed", "packed_naive"]
    assert [arms[a]["n_seeds"] for a in arms] == [3, 3, 2, 1]
    assert arms["masked"]["eval_loss"]["mean"] == pytest.approx(3.0)
    assert arms["masked"]["eval_loss"]["sd"] == pytest.approx(0.1)
    assert arms["masked"]["paired_delta_vs_reference"] is None
    assert arms["unmasked"]["paired_delta_vs_reference"]["ci95"] == pytest.approx(
        [0.0141507, 0.1391826], abs=1e-6)
    assert arms["packed"]["paired_delta_vs_reference"]["ci95"] == pytest.approx(
        [-0.1955931, 0.1855931], abs=1e-6)
    # throughput: the median of the logged windows (1005, 1010 -> 1007.5); pad fraction: mean
    assert arms["masked"]["real_tokens_per_s"]["mean"] == pytest.approx(1007.5)
    assert arms["packed"]["pad_fraction"]["mean"] == pytest.approx(0.01)
    assert arms["masked"]["eval_loss_unmasked"]["mean"] == pytest.approx(3.5)
    # the eval curve: the steps every seed evaluated, x in epochs from the train records
    curve = arms["masked"]["curve"]
    assert curve["step"] == [0, 5, 10] and curve["epoch"] == pytest.approx([0.0, 0.5, 1.0])
    assert curve["mean"][-1] == pytest.approx(3.0) and curve["max"][-1] == pytest.approx(3.1)

    # unfinished and never-started runs are reported, not dropped, and never crash the report
    status = {(r["arm"], r["seed"]): r["status"] for r in numbers["runs"]}
    assert status[("packed", 2)] == "unfinished" and status[("packed_naive", 1)] == "missing"
    assert numbers["n_runs"] == 12 and numbers["n_finished"] == 9
    assert numbers["arm_differences"]["padding"]["packed"] == "packed"
    assert "learning_rate" not in numbers["arm_differences"]

    md = (ablation / "report.md").read_text()
    for arm in LOSSES:
        assert f"| `{arm}` |" in md
    assert "+0.0767 [+0.0142, +0.1392]" in md                  # unmasked vs masked
    assert "[n/a: 1 seed]" in md                                 # packed_naive, one seed
    assert "the interval excludes 0: `unmasked` ends with a higher eval loss" in md
    assert "the interval includes 0: no difference detectable with 2 seeds" in md
    assert "3 of 12 runs did not finish" in md and "launch.log" in md
    assert "Fill-mask" not in md and numbers["fill_mask"] is None  # runs without the check
    assert numbers["padding"] is True and "averaged weights" not in md  # no --average_checkpoints
    # an extra comparison from the plan: unmasked - packed over seeds 0, 1: (0.04, 0.12)
    (extra,) = numbers["comparisons"]
    assert (extra["arm"], extra["against"]) == ("unmasked", "packed")
    assert extra["paired_delta"]["mean"] == pytest.approx(0.08)
    assert "`unmasked` − `packed`: final eval loss Δ = +0.0800" in md
    saved = json.loads((ablation / "report.json").read_text())
    assert saved["arms"]["unmasked"]["eval_loss"]["per_seed"] == pytest.approx(
        {"0": 3.05, "1": 3.20, "2": 2.98})
    assert sorted(numbers["plots"]) == sorted(set(PLOTS) - {"downstream.png"})  # none measured
    assert numbers["downstream"] == [] and "## Downstream" not in md
    for name in numbers["plots"]:
        png = ablation / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name


def test_fill_mask_check_per_arm(ablation):
    """Mean rank of the masked word after training per arm (over sentences, then seeds), and the
    top-1 of each sentence from each arm's lowest seed; runs without the check are left out."""
    ranks = {"masked": 2, "unmasked": 6, "packed": 1}  # packed_naive: no check (older runs)
    for file in ablation.glob("*/seed*/summary.json"):
        arm, seed = file.parent.parent.name, int(file.parent.name[4:])
        if arm not in ranks:
            continue
        summary = json.loads(file.read_text())
        summary["fill_mask"] = [
            {"text": f"sentence {i} [MASK].", "answer": "word", "before": ["x"] * 5,
             "after": [f"{arm}{seed}", "y", "y", "y", "y"], "rank_before": 1000,
             "rank_after": ranks[arm] + i} for i in range(2)]
        file.write_text(json.dumps(summary))
    numbers = R.build_report(ablation)
    arms = numbers["arms"]
    assert arms["masked"]["fill_mask_rank_after"]["mean"] == pytest.approx(2.5)  # (2 + 3) / 2
    assert arms["masked"]["fill_mask_rank_before"]["mean"] == pytest.approx(1000)
    assert arms["packed"]["fill_mask_rank_after"]["n"] == 2  # its seed 2 did not finish
    assert arms["packed_naive"]["fill_mask_rank_after"]["n"] == 0
    check = numbers["fill_mask"]
    assert [s["text"] for s in check["sentences"]] == ["sentence 0 [MASK].", "sentence 1 [MASK]."]
    assert check["top1_after"] == {"masked": ["masked0"] * 2, "unmasked": ["unmasked0"] * 2,
                                   "packed": ["packed0"] * 2}
    md = (ablation / "report.md").read_text()
    assert "`masked` 2.5 (before: 1,000), `unmasked` 6.5 (before: 1,000)" in md
    assert "## Fill-mask check" in md
    assert "| sentence 0 [MASK]. | word | masked0 | unmasked0 | packed0 |" in md


def test_report_without_plan_and_with_a_broken_run(tmp_path):
    """Runs found by folder alone (arm from the W&B tags); a corrupt summary.json is reported."""
    root = tmp_path / "loose"
    write_run(root / "a" / "seed0", "masked", 0, 3.0)
    write_run(root / "b" / "seed0", "unmasked", 0, 3.1)
    write_run(root / "c" / "seed1", "unmasked", 1, 3.2)
    (root / "c" / "seed1" / "summary.json").write_text("{not json")
    (root / "a" / "seed0" / "wandb" / "run" / "files").mkdir(parents=True)  # not a run folder
    (root / "a" / "seed0" / "wandb" / "run" / "files" / "config.yaml").write_text("x: 1\n")

    numbers = R.build_report(root)
    assert set(numbers["arms"]) == {"masked", "unmasked"}
    assert numbers["n_runs"] == 3 and numbers["n_finished"] == 2
    broken = [r for r in numbers["runs"] if r["status"] == "unreadable"]
    assert len(broken) == 1 and "summary.json" in broken[0]["note"]
    d = numbers["arms"]["unmasked"]["paired_delta_vs_reference"]
    assert d["n"] == 1 and d["mean"] == pytest.approx(0.1) and d["ci95"] is None
    assert "from a single paired seed" in (root / "report.md").read_text()


def test_cli(tmp_path, ablation, capsys):
    out = tmp_path / "elsewhere"
    assert R.main([str(ablation), "--reference", "unmasked", "--output_dir", str(out)]) == 0
    assert "9/12 runs finished" in capsys.readouterr().out
    saved = json.loads((out / "report.json").read_text())
    assert saved["reference"] == "unmasked"
    assert saved["arms"]["masked"]["paired_delta_vs_reference"]["mean"] == pytest.approx(-0.0766667,
                                                                                         abs=1e-6)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert R.main([str(empty)]) == 2
    assert R.main([str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_report_of_other_flags_leaves_the_padding_measurements_out(tmp_path):
    """Arms that differ in other flags than mask_padding (here the masking and the optimizer):
    no mask-withheld or pad-sensitivity column, sentence or plot; paired differences, the
    reference (the plan's first arm when it names none) and what the arms change stay."""
    root = tmp_path / "recipe"
    arms = {"classic": {"mlm_probability": 0.15, "eval_mlm_probability": 0.15},
            "modern": {"mlm_probability": 0.3, "eval_mlm_probability": 0.15,
                       "padding": "packed"}}
    for seed, (classic, modern) in enumerate([(3.0, 2.9), (3.1, 3.05), (2.9, 2.82)]):
        for arm, loss in (("classic", classic), ("modern", modern)):
            write_run(root / arm / f"seed{seed}", arm, seed, loss, flags=arms[arm])
        summary = root / "modern" / f"seed{seed}" / "summary.json"  # --average_checkpoints
        summary.write_text(json.dumps({**json.loads(summary.read_text()),
                                       M.EVAL_AVG_LOSS: modern - 0.02}))
    (root / PLAN_FILE).write_text(json.dumps({
        "name": "recipe", "arms": list(arms), "seeds": [0, 1, 2],
        "runs": [{"arm": a, "seed": s, "output_dir": f"{a}/seed{s}"}
                 for s in range(3) for a in arms]}))

    numbers = R.build_report(root)
    assert numbers["padding"] is False and numbers["reference"] == "classic"
    assert numbers["eval_mlm_probability"] == 0.15 and not numbers["notes"]
    d = numbers["arms"]["modern"]["paired_delta_vs_reference"]  # d = (-0.10, -0.05, -0.08)
    assert d["n"] == 3 and d["mean"] == pytest.approx(-0.0766667, abs=1e-6)
    assert d["ci95"] == pytest.approx([-0.1391826, -0.0141507], abs=1e-6)
    assert numbers["arm_differences"]["mlm_probability"] == {"classic": 0.15, "modern": 0.3}
    assert numbers["arms"]["modern"]["pad_sensitivity"]["mean"] == pytest.approx(0.1)  # kept

    md = (root / "report.md").read_text()
    assert md.startswith("# Ablation report: recipe\n")
    assert "(summary.json), at an eval masking rate of 0.15 in every arm;" in md
    assert "| arm | n seeds | final eval loss (mean ± sd) | perplexity | eval loss, averaged " \
           "weights | paired Δ loss vs classic [95% CI] | real tokens/s | pad fraction | " \
           "runtime (s) |" in md
    assert "| `modern` | 3 | 2.9233 ± 0.1168 | 18.69 | 2.9033 | -0.0767 [-0.1392, -0.0142] |" \
        in md and "| `classic` | 3 | 3.0000 ± 0.1000 | 20.15 | n/a | (reference) |" in md
    assert "averaged weights (model_avg/: the final weights and the checkpoints before them, " \
           "mean over seeds): `modern` 2.9033 (-0.0200 vs its final weights)." in md
    assert "`modern` ends with a lower eval loss than `classic`" in md
    assert "| mlm_probability | 0.15 | 0.3 |" in md and "| padding | None | packed |" in md
    for padding_only in ("mask withheld", "Withholding", "ad sensitivity"):
        assert padding_only not in md, padding_only
    assert not (root / "pad_sensitivity.png").exists()
    assert sorted(numbers["plots"]) == ["eval_loss.png", "paired_delta.png", "perplexity.png",
                                        "throughput.png"]

    # arms evaluated at different masking rates: said, since their losses do not compare
    config = root / "modern" / "seed0" / "config.yaml"
    config.write_text(config.read_text().replace("eval_mlm_probability: 0.15",
                                                 "eval_mlm_probability: 0.3"))
    numbers = R.build_report(root)
    assert numbers["eval_mlm_probability"] is None
    assert any("eval_mlm_probability: classic 0.15, modern 0.3" in n for n in numbers["notes"])


@pytest.mark.parametrize("report", ["ablation", "ablation/scratch/bert",
                                    "ablation/scratch/roberta", "ablation/trained_head"])
def test_committed_reports_still_render(report):
    """The padding reports under docs/ (some written before the padding key or the downstream
    measures existed) render as padding reports: every arm's row with the padding columns, a
    Downstream table exactly where the runs measured it, and the plan they came with reads."""
    folder = ROOT / "docs" / report
    numbers = json.loads((folder / "report.json").read_text())
    md = render_markdown(numbers, numbers["plots"])
    assert md.startswith("# Padding ablation report: ")
    assert ("## Downstream" in md) == bool(numbers.get("downstream"))  # none measured: none
    assert "eval loss, mask withheld" in md and "Pad sensitivity (mean" in md
    for arm in ("masked", "unmasked", "packed", "packed_naive"):
        assert f"| `{arm}` | {numbers['arms'][arm]['n_seeds']} |" in md
    plan = json.loads((folder / PLAN_FILE).read_text())
    assert plan["reference"] == "masked" and len(plan["runs"]) == len(numbers["runs"])


# Final downstream values per arm and seed (two probes, each arm's unmasked accuracy, PPPL).
# Hand computation of the paired differences vs `masked`, movies probe accuracy:
#   unmasked: d = (-0.02, -0.04, -0.03): mean -0.03, sd 0.01, se 0.01/sqrt(3) = 0.0057735
#             half-width 4.302653 * 0.0057735 = 0.0248414 -> CI [-0.0548414, -0.0051586]
#   as trained (unmasked's unmasked accuracy 0.70, 0.71, 0.69 vs masked's masked 0.80, 0.82,
#   0.81): d = (-0.10, -0.11, -0.12): mean -0.11, same sd -> CI [-0.1348414, -0.0851586]
DOWNSTREAM = {"masked": {0: (0.80, 0.60, 20.0), 1: (0.82, 0.61, 21.0), 2: (0.81, 0.62, 22.0)},
              "unmasked": {0: (0.78, 0.60, 25.0), 1: (0.78, 0.59, 26.0), 2: (0.78, 0.63, 24.0)}}
UNMASKED_MOVIES = {"masked": {0: 0.5, 1: 0.5, 2: 0.5}, "unmasked": {0: 0.70, 1: 0.71, 2: 0.69}}


def write_downstream_runs(root):
    """The DOWNSTREAM runs' folders under ``root``: final losses 3.0, 3.1, 3.2 by seed in both
    arms, and the probes' and pseudo-perplexity's final values in summary.json."""
    for arm, per_seed in DOWNSTREAM.items():
        for seed, (movies, tweets, pppl) in per_seed.items():
            folder = root / arm / f"seed{seed}"
            write_run(folder, arm, seed, 3.0 + seed / 10)
            summary = json.loads((folder / "summary.json").read_text())
            summary.update({
                M.probe_key(M.EVAL_PROBE_ACCURACY, "movies"): movies,
                M.probe_key(M.EVAL_PROBE_ACCURACY_UNMASKED, "movies"): UNMASKED_MOVIES[arm][seed],
                M.probe_key(M.EVAL_PROBE_ACCURACY, "tweets"): tweets,
                M.probe_key(M.EVAL_PROBE_ACCURACY_UNMASKED, "tweets"): tweets - 0.05,
                M.EVAL_PSEUDO_PERPLEXITY: pppl,
                # step 0: the same model in both arms (seed k: 0.50 + k / 100 with the mask,
                # 0.40 without it); the pseudo-perplexity not measured then
                M.FIRST_EVAL_PROBE_ACCURACY + "/movies": 0.50 + seed / 100,
                M.FIRST_EVAL_PROBE_ACCURACY_UNMASKED + "/movies": 0.40})
            (folder / "summary.json").write_text(json.dumps(summary))
    return root



def test_report_with_downstream_measures(tmp_path):
    """Runs that probed two files (--probe_file movies.tsv tweets.tsv, --probe_mask_padding both)
    and measured the pseudo-perplexity: per arm and seed each probe's accuracy as users run the
    model, as the arm was trained, and the PPPL, with paired Δ vs the reference; a table, a
    sentence, downstream.png and report.json carry them."""
    root = write_downstream_runs(tmp_path / "abl")
    numbers = R.build_report(root, reference="masked")
    measures = {m["name"]: m for m in numbers["downstream"]}
    assert list(measures) == ["probe_accuracy/movies", "probe_accuracy/movies/as_trained",
                              "probe_accuracy/tweets", "probe_accuracy/tweets/as_trained",
                              "pseudo_perplexity"]
    movies = measures["probe_accuracy/movies"]["arms"]
    assert movies["masked"]["per_seed"] == pytest.approx({"0": 0.80, "1": 0.82, "2": 0.81})
    assert movies["masked"]["paired_delta_vs_reference"] is None
    d = movies["unmasked"]["paired_delta_vs_reference"]
    assert d["mean"] == pytest.approx(-0.03)
    assert d["ci95"] == pytest.approx([-0.0548414, -0.0051586], abs=1e-6)
    trained = measures["probe_accuracy/movies/as_trained"]["arms"]
    assert trained["masked"]["per_seed"] == movies["masked"]["per_seed"]  # trained masked
    assert trained["unmasked"]["per_seed"] == pytest.approx({"0": 0.70, "1": 0.71, "2": 0.69})
    d = trained["unmasked"]["paired_delta_vs_reference"]
    assert d["ci95"] == pytest.approx([-0.1348414, -0.0851586], abs=1e-6)
    assert measures["pseudo_perplexity"]["arms"]["unmasked"]["paired_delta_vs_reference"][
        "mean"] == pytest.approx(4.0)
    # step 0: the mean over seeds of each run's first value, masked or as the arm trained
    assert movies["masked"]["step0_mean"] == pytest.approx(0.51)
    assert movies["unmasked"]["step0_mean"] == pytest.approx(0.51)
    assert trained["unmasked"]["step0_mean"] == pytest.approx(0.40)
    assert trained["masked"]["step0_mean"] == pytest.approx(0.51)
    assert measures["pseudo_perplexity"]["arms"]["masked"]["step0_mean"] is None

    md = (root / "report.md").read_text()
    assert "## Downstream" in md
    assert "| probe accuracy, movies | `unmasked` | 3 | 0.5100 | 0.7800 ± 0.0000 | 0.7800, " \
           "0.7800, 0.7800 | -0.0300 [-0.0548, -0.0052] |" in md
    assert "| probe accuracy as trained, movies | `unmasked` | 3 | 0.4000 |" in md
    assert "| probe accuracy, tweets | `masked` | 3 | n/a | 0.6100 ± 0.0100 |" in md
    assert "| pseudo-perplexity | `unmasked` | 3 | n/a | 25.00 ± 1.00 |" in md
    assert "whose 95% interval excludes 0: probe accuracy, movies: `unmasked` -0.03" in md
    assert "downstream.png" in numbers["plots"] and (root / "downstream.png").stat().st_size > 5000
    saved = json.loads((root / "report.json").read_text())
    assert saved["downstream"][0]["arms"]["unmasked"]["per_seed"] == pytest.approx(
        {"0": 0.78, "1": 0.78, "2": 0.78})


def test_regimes_side_by_side(tmp_path, ablation, capsys):
    """`python -m mlmkit.report.across`: one row per report, report.json's paired differences
    with their intervals and seeds above zero (bold where the interval excludes 0), a downstream
    table only for the regimes that measured it, and each row linked to its report.md."""
    R.build_report(ablation)
    downstream = R.build_report(write_downstream_runs(tmp_path / "down"), reference="masked")
    assert downstream["downstream"]
    out = tmp_path / "docs" / "regimes.md"
    assert A.main([f"pretrained={ablation}", f"with probes={tmp_path / 'down'}",
                   "--output", str(out)]) == 0
    md = out.read_text()
    # unmasked - masked in the fixture: d = (0.05, 0.10, 0.08), CI [0.0141507, 0.1391826]
    # unmasked: bold (CI [0.0141507, 0.1391826] excludes 0); packed: seeds 0 and 1 only, CI
    # [-0.1955931, 0.1855931]; packed_naive: one seed; the plan's comparison gets its column
    assert ("| `unmasked` − reference | `packed` − reference | `packed_naive` − reference | "
            "`unmasked` − `packed` |") in md
    assert ("| [pretrained](../abl/report.md) | 3 | `masked`: 3.000 (20.2) | "
            "**+0.077 [+0.014, +0.139]**, 3/3 | -0.005 [-0.196, +0.186], 1/2 | "
            "+0.200 [n/a: 1 seed], 1/1 | +0.080 [-0.428, +0.588], 2/2 |") in md
    # the second regime: no packed arms (—); losses equal by seed, so a zero difference;
    # PPPL d = (5, 5, 2): mean 4, sd sqrt(3), se 1 -> CI 4 -/+ 4.302653
    assert "| [with probes](../down/report.md) | 3 | `masked`: 3.100 (22.3) | " \
           "+0.000 [+0.000, +0.000], 0/3 | — | — | — |" in md
    assert "| [with probes](../down/report.md) | probe accuracy, movies | `masked`: 0.810 " \
           "(step 0: 0.510) | " \
           "**-0.030 [-0.055, -0.005]**, 0/3 | — | — |" in md
    assert "| [with probes](../down/report.md) | pseudo-perplexity | `masked`: 21.0 | " \
           "+4.0 [-0.3, +8.3], 3/3 | — | — |" in md
    assert "No downstream measures in: pretrained." in md
    assert "pretrained" not in md.split("## Downstream")[1].split("No downstream")[0]
    assert capsys.readouterr().out.strip() == f"2 regimes -> {out}"

    # a folder without a report: one line naming the fix, nothing written
    assert A.main([str(ablation), str(tmp_path / "none"), "--output", str(tmp_path / "x.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none/report.json: no such file" in err[0] and "Fix:" in err[0]
    assert not (tmp_path / "x.md").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.json").write_text('{"name": "not a report"}')
    assert A.main([str(tmp_path / "other")]) == 2
    assert "other/report.json: not a report.json written by mlmkit.report. Fix: rebuild it " \
           "with `python -m mlmkit.report" in capsys.readouterr().err


def test_committed_regimes_table_matches_the_reports():
    """docs/ablation/regimes.md is what `make ablation-regimes` writes from the committed
    report.json files: a number in it cannot drift from the reports."""
    make = (ROOT / "Makefile").read_text()
    specs = shlex.split(make.split("REGIMES :=", 1)[1].split("\n\n", 1)[0].replace("\\\n", " "))
    regimes = [A.read_regime(f"{label}={ROOT / folder}")
               for label, folder in (spec.split("=", 1) for spec in specs)]
    # at least four regimes, each with the downstream measures per arm, one with a trained head
    assert len(regimes) >= 4 and all(numbers.get("downstream") for _, _, numbers in regimes)
    assert any("trained head" in label for label, _, _ in regimes)
    committed = (ROOT / "docs" / "ablation" / "regimes.md").read_text()
    assert committed == A.render_across(regimes, base=ROOT / "docs" / "ablation")


def _table(md: str, header_start: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table whose header starts so."""
    lines = md[md.index(header_start):].splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [rows[0]] + rows[2:]  # the header, then the body (not the |---| line)


def _label(cell: str) -> str:
    return cell.split("](")[0].lstrip("[") if cell.startswith("[") else cell


def test_readme_downstream_answer_quotes_the_regimes_table():
    """The README's downstream answer: each cell is the regimes table's, for the same regime and
    measure (`unmasked` − `masked`), so the front page cannot drift from the reports."""
    regimes_md = (ROOT / "docs" / "ablation" / "regimes.md").read_text()
    loss = {_label(r[0]): r for r in _table(regimes_md, "| regime | seeds |")[1:]}
    down_table = _table(regimes_md, "| regime | measure |")
    column = down_table[0].index("`unmasked` − reference")
    down = {(_label(r[0]), r[1]): r[column] for r in down_table[1:]}
    loss_column = _table(regimes_md, "| regime | seeds |")[0].index("`unmasked` − reference")
    readme = _table((ROOT / "README.md").read_text(), "| regime (`unmasked` − `masked`) |")
    header, rows = readme[0], readme[1:]
    assert header[1] == "eval loss" and len(rows) >= 4
    for row in rows:
        regime = _label(row[0])
        assert row[1] == loss[regime][loss_column], regime
        for measure, cell in zip(header[2:], row[2:]):
            assert cell == down[(regime, measure)], (regime, measure)
