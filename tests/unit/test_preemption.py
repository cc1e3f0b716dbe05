"""preemption.py: SIGTERM/SIGINT set a flag that every process agrees on at a step boundary."""

from __future__ import annotations

import os
import signal
import types

from mlmkit.preemption import StopSignal


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
