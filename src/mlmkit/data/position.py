"""`DataPosition`: where a process's data stands after a step, the one shape both step sources
resume from (no torch: a checkpoint's state reads it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataPosition:
    """Where this process's data stands after a step, in one shape for both step sources
    (`prefetch.PlannedSteps`, `streaming.StreamSteps`), which resume from it to the same
    following steps. Map-style: the plan's ``epoch`` and the ``step`` of it to run next.
    ``--streaming``: ``epoch`` is the pass of the step's newest example, ``stream`` the start of
    the step's window (`streaming.StreamPosition`, a dict) and ``step`` the steps of that window
    done. Both: ``done``, the run's optimizer steps done (the per-step schedules, `shape.Ramps`,
    are functions of it). JSON-able (`to_dict`)."""
    epoch: int = 0
    step: int = 0
    stream: dict | None = None
    done: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "stream": self.stream, "done": self.done}

    @classmethod
    def from_dict(cls, data: dict) -> "DataPosition":
        return cls(data["epoch"], data["step"], data.get("stream"), data.get("done", 0))
