"""metrics.py's summary: the step-0 values of the downstream measures beside the final ones, for
one probe file (the plain names) and several (each probe's `<metric>/<stem>`); stds and other
metrics get none."""

from __future__ import annotations

from mlmkit.train import tracking as M
from mlmkit.train.checkpoint import TrainState
from mlmkit.train.metrics import build_summary


def test_the_summary_gives_each_probes_step_0_value():
    state = TrainState(launch={})
    movies = M.probe_key(M.EVAL_PROBE_ACCURACY, "movies")
    tweets = M.probe_key(M.EVAL_PROBE_ACCURACY_UNMASKED, "tweets")
    state.first_eval = {M.EVAL_LOSS: 5.0, M.EVAL_PERPLEXITY: 148.4, M.EVAL_PROBE_ACCURACY: 0.7,
                        movies: 0.6, M.probe_key(M.EVAL_PROBE_ACCURACY_STD, "movies"): 0.01,
                        tweets: 0.5, M.EVAL_PSEUDO_PERPLEXITY: 50.0, M.EVAL_LOSS_UNMASKED: 5.5}
    summary = build_summary(state, {M.EVAL_LOSS: 4.0}, num_processes=1, peak_tflops=None,
                            parts=[], fill_mask=[])
    assert {k: v for k, v in summary.items() if k.startswith("first/")} == {
        M.FIRST_EVAL_LOSS: 5.0, M.FIRST_EVAL_PERPLEXITY: 148.4, M.FIRST_EVAL_PROBE_ACCURACY: 0.7,
        "first/eval/probe_accuracy/movies": 0.6, "first/eval/probe_accuracy_unmasked/tweets": 0.5,
        M.FIRST_EVAL_PSEUDO_PERPLEXITY: 50.0}
