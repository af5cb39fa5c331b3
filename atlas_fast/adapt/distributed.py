"""Data-parallel coefficient learning on torch.distributed, for runs launched by torchrun.

The coefficients are the only trainable tensor, so a step all-reduces kilobytes: their gradient, the loss and
the objective's statistics, in one call. Rank r of W takes its contiguous share of every stream's global batch,
with the augmentation seeds the global batch gives those items, so W processes compute the step that one
process computes on the same global batch, up to the float32 rounding of the sum. Evaluation is shared the same
way and its counts summed. Rank 0 writes every file; a checkpoint holds nothing that depends on W, so a run
resumes with another process count.

The stream modes (streams.py) split the other way: the streams are independent, so rank r owns a contiguous share
of them (their data, coefficient sets and optimiser state) and runs its grouped steps alone; at the end every rank
gathers every stream's results (Ranks.share, Ranks.all_gather) and rank 0 writes the files one process writes.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist


class Ranks:
    """This process's place among the W processes of a run (W = 1: a plain single-process run), and the device
    its reductions run on (the GPU for NCCL)."""

    def __init__(self, rank=0, world=1, device="cpu"):
        self.rank, self.world, self.device = rank, world, torch.device(device)

    @property
    def main(self):
        return self.rank == 0

    def share(self, items):
        """This rank's contiguous share of `items` (all of them when W = 1)."""
        n = len(items)
        return items[n * self.rank // self.world: n * (self.rank + 1) // self.world]

    def sum_(self, tensor):
        """Sum `tensor` over the ranks, in place; returns it."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def mean_(self, tensor):
        return self.sum_(tensor).div_(self.world) if self.world > 1 else tensor

    def broadcast_(self, tensor):
        """Rank 0's values of `tensor` on every rank, in place; returns it."""
        if self.world > 1:
            dist.broadcast(tensor, 0)
        return tensor

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_gather(self, items):
        """Every rank's list `items` (picklable, CPU tensors), concatenated in rank order, on every rank."""
        if self.world == 1:
            return list(items)
        parts = [None] * self.world
        dist.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    def gather(self, items):
        """all_gather, but the concatenation only on rank 0 (None elsewhere): for what only rank 0 writes."""
        if self.world == 1:
            return list(items)
        parts = [None] * self.world if self.main else None
        dist.gather_object(list(items), parts, dst=0)
        return [x for part in parts for x in part] if self.main else None

    def check_divides(self, what, size):
        """Raise unless a global batch of `size` items splits evenly: only then is the mean of the ranks'
        mean losses the mean over the global batch."""
        if size % self.world:
            raise ValueError(f"{what}={size}: a global batch must split evenly across the {self.world} "
                             f"processes; use a multiple of {self.world}")


def launched():
    """True in a process that torchrun started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main():
    """True unless this process is a torchrun rank other than 0 (for printing and writing files)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def local_device(device):
    """Under torchrun, a bare "cuda" device becomes this process's own GPU, cuda:LOCAL_RANK."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def world_size():
    """W: the processes of this run (1 outside torchrun), known before the process group is joined."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


# A stream-mode run meets in a collective only at its end, where the ranks whose streams finish first wait for the
# slowest: the default timeouts (10 min for NCCL, 30 for gloo) would abort a run whose shares differ by more. A
# failed rank still ends the run at once: torchrun stops the other processes.
STREAMS_TIMEOUT = timedelta(days=7)


def check_streams(streams, mode):
    """Raise unless every process of the run can own at least one of `streams` streams (W <= streams)."""
    world = world_size()
    if world > streams:
        raise ValueError(f"--{mode} under torchrun: {world} processes (--nproc-per-node) for {streams} streams "
                         f"(--data); each process owns whole streams, so start at most {streams}")


def ranks(device, timeout=None):
    """The Ranks of this process. Under torchrun it joins (or first creates, with `timeout` for its collectives
    when given) the default process group: NCCL for a run on GPUs, gloo on CPUs."""
    device = torch.device(device)
    if not (dist.is_available() and dist.is_initialized()):
        if not launched():
            return Ranks(device=device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"timeout": timeout} if timeout is not None else {}))
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def finish():
    """Leave the default process group, if this process is in one (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
