"""preemption.py: SIGTERM/SIGINT set a flag that every process agrees on at a step boundary."""

from __future__ import annotations

import os
import signal
import types

from mlmkit.train.preemption import StopSignal


def test_stop_signal_sets_a_flag_instead_of_killing():
    accelerator = types.SimpleNamespace(num_processes=1)
    before = signal.getsignal(signal.SIGTERM)
    stopper = StopSignal().install()
    try:
        assert not stopper.agreed(accelerator)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt either
        assert stopper.received == "SIGTERM" and stopper.agreed(accelerator)
    finally:
        stopper.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_checkpoint_slower_than_the_launchers_grace_is_warned_once():
    """Accelerate >= 1.16's one-process launcher SIGKILLs the run 5 s after a signal: a
    periodic checkpoint that takes longer than 3 s is one warning naming the way out, once."""
    from mlmkit.train import preemption
    stopper, lines = StopSignal(), []
    assert not stopper.warn_if_stop_outlasts_launcher(7.0, lines.append, launcher=False)
    assert not stopper.warn_if_stop_outlasts_launcher(1.0, lines.append, launcher=True)
    assert stopper.warn_if_stop_outlasts_launcher(7.0, lines.append, launcher=True)
    assert not stopper.warn_if_stop_outlasts_launcher(9.0, lines.append, launcher=True)
    assert len(lines) == 1 and "took 7.0 s" in lines[0] and "python recipes/mlm.py" in lines[0]
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in lines[0]
    assert StopSignal().warn_if_stop_outlasts_launcher(7.0, lines.append, launcher=True)  # a run
    assert not preemption.under_tree_killing_launcher()  # pytest is no launcher
