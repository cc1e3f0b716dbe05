"""Batch plans: which examples every process sees in every micro-batch of every step.

The plan is computed, not sampled on the fly, so it is reproducible (a function of seed, epoch
and the dataset's lengths), distributed-aware without a DistributedSampler, and resumable at any
step. Every process computes the same global plan and takes its own slice.

One optimizer step consumes one *global batch* of ``per_device_batch_size x grad_accum x
num_processes`` examples, split into ``grad_accum x num_processes`` micro-batches. The last global
batch of an epoch may be short: it is split as evenly as possible, and a process whose micro-batch
comes out empty runs a *dummy* micro-batch (returned as an empty list) that contributes no loss and
no gradient. Every process therefore runs the same number of forward passes (ZeRO-3 needs this),
every example is seen exactly once per epoch, and because the loss is normalised by the global
count of masked tokens, uneven micro-batches weigh exactly as they should.

With ``group_by_length`` the shuffled order is cut into mega-batches of 50 global batches, each
sorted by length (longest first) and cut into global batches, whose order is then shuffled again:
micro-batches hold examples of similar length (little padding), while the step order stays random.
"""

from __future__ import annotations

import numpy as np

MEGABATCH_MULT = 50


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


class TrainPlan:
    def __init__(self, lengths, *, per_device_batch_size: int, grad_accum: int,
                 num_processes: int, process_index: int, seed: int, group_by_length: bool = False):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.per_device_batch_size = per_device_batch_size
        self.grad_accum = grad_accum
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.group_by_length = group_by_length
        self.global_batch_size = per_device_batch_size * grad_accum * num_processes

    def __len__(self) -> int:
        """Optimizer steps per epoch (the last one may be short)."""
        return -(-len(self.lengths) // self.global_batch_size)

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        rng = _rng(self.seed, epoch)
        order = rng.permutation(len(self.lengths))
        gbs = self.global_batch_size
        if not self.group_by_length:
            return [order[i:i + gbs] for i in range(0, len(order), gbs)]
        mega = gbs * MEGABATCH_MULT
        batches: list[np.ndarray] = []
        for start in range(0, len(order), mega):
            chunk = order[start:start + mega]
            # stable sort, longest first: a pure function of (seed, epoch, lengths)
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + gbs] for i in range(0, len(chunk), gbs)]
        # Shuffle whole batches, keeping the short tail batch last so that only the final step
        # of an epoch can be uneven.
        full = [b for b in batches if len(b) == gbs]
        tail = [b for b in batches if len(b) < gbs]
        return [full[i] for i in rng.permutation(len(full))] + tail

    def split(self, global_batch: np.ndarray) -> list[list[int]]:
        """This process's ``grad_accum`` micro-batches of one global batch (empty = dummy)."""
        n_micro = self.grad_accum * self.num_processes
        if len(global_batch) == self.global_batch_size:
            chunks = np.split(global_batch, n_micro)
        else:
            chunks = np.array_split(global_batch, n_micro)
        # micro-batch g of process r is chunk g * num_processes + r
        return [chunks[g * self.num_processes + self.process_index].tolist()
                for g in range(self.grad_accum)]

    def epoch(self, epoch: int, start_step: int = 0):
        """Yield ``(step_in_epoch, micro_batches)`` from ``start_step`` on (resume skips ahead)."""
        for step, gb in enumerate(self.global_batches(epoch)):
            if step >= start_step:
                yield step, self.split(gb)


def eval_plan(n: int, batch_size: int, num_processes: int, process_index: int) -> list[list[int]]:
    """Shard ``range(n)`` into this process's eval batches without duplicating any example.

    All processes get the same number of batches; where a process runs out, it gets an empty
    (dummy) batch, which the caller runs with zero weight.
    """
    shard = list(range(process_index, n, num_processes))
    n_batches = -(-(-(-n // num_processes)) // batch_size)  # ceil(ceil(n / P) / B)
    return [shard[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]
