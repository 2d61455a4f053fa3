"""Data parallelism over processes (accelerate): which share of the work a process does, and putting the
shares back together, so that a run under ``accelerate launch`` ends with what one process would write.

    accelerate launch --multi_gpu --num_processes 8 -m visedit.cli heatmaps --backbone llava --n 1000   # 8 GPUs
    accelerate launch --multi_gpu --num_processes 2 -m visedit.cli edit --backbone blip2   # no GPU: 2 CPU processes

On a machine without a visible GPU (or with ``ACCELERATE_USE_CPU=true``) the processes join a gloo group on
the CPU. (accelerate 1.16's ``--cpu`` flag starts several CPU processes only through MPI (``mpirun``); its
``--multi_gpu`` launcher is torchrun, which needs nothing installed, so that is the one to use on CPUs too.)

Every process runs the same command on the whole input and takes its share by number (`Processes`):
attribution chunks round-robin, training batches as consecutive slices of the global batch. Results travel
through collectives (`gather`, `sum_`), never through each other's files, so the processes need no shared
disk; only the main process (rank 0) locks and writes the outputs. A process started alone (no
``WORLD_SIZE`` in its environment, or 1) is a world of one: every function here is then the identity and no
process group is made, so plain ``visedit`` runs pay nothing for this module.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among ``world`` processes (rank 0 is the main one)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def round_robin(self, items: Sequence[T]) -> list[T]:
        """The items this process does when they are dealt out one by one: ``items[rank::world]``."""
        return list(items[self.rank::self.world])

    def slice_of(self, n: int) -> slice:
        """This process's consecutive share of ``n`` items (``n`` must divide evenly: a global batch)."""
        if n % self.world:
            raise ValueError(f"a batch of {n} cannot be split evenly over {self.world} processes; make the batch "
                             f"size a multiple of the number of processes")
        size = n // self.world
        return slice(self.rank * size, (self.rank + 1) * size)


def launched() -> bool:
    """Whether this process was started as one of several (``accelerate launch`` / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _state():
    """accelerate's process state (joins the process group the first time): gloo on the CPU when no GPU is
    visible or ACCELERATE_USE_CPU is set, else the GPU backend."""
    from accelerate import PartialState

    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return PartialState(cpu=on_cpu)


def processes() -> Processes:
    """This process's `Processes`; joins the process group when launched."""
    if not launched():
        return Processes()
    state = _state()
    return Processes(state.process_index, state.num_processes)


def device() -> torch.device | None:
    """The device accelerate gives this process when launched (``cuda:<local rank>`` or cpu); None alone."""
    return _state().device if launched() else None


def barrier() -> None:
    """Wait until every process gets here (nothing alone)."""
    if launched():
        _state().wait_for_everyone()


def finish() -> None:
    """Leave the process group, if this process joined one. Every launched command ends here: a process
    that exits with the group still alive leaves gloo's worker threads to the interpreter's teardown, which
    now and then aborts the process ("terminate called without an active exception") after its work is done.
    Leaving is local (no barrier), so a process that is done need not wait for the main one to write."""
    if launched() and torch.distributed.is_available() and torch.distributed.is_initialized():
        _state().destroy_process_group()


def gather(value: Any) -> list[Any]:
    """``value`` of every process, in rank order, on every process (``[value]`` alone). Tensors inside are
    sent as they are (CPU tensors through the process group's object transport)."""
    if not launched():
        return [value]
    from accelerate.utils import gather_object

    _state()
    return gather_object([value])


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over the processes (a copy; ``tensor`` itself alone)."""
    if not launched():
        return tensor
    from accelerate.utils import reduce

    _state()
    return reduce(tensor, reduction="sum")


@contextlib.contextmanager
def main_first(context) -> Iterator[None]:
    """Enter ``context`` (a lock on an output folder) on the main process only, the others waiting until it
    holds it. Leaving has no barrier: the other processes finish their share (ending in a collective of their
    own) and may exit while the main one still writes, with no process-group timeout to meet."""
    if not launched():
        with context:
            yield
        return
    if processes().main:
        with context:
            barrier()
            yield
    else:
        barrier()
        yield


def sum_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its sum over the processes, in one collective (each process
    back-propagated its share of the global batch's loss, so the sum is the global gradient: DDP's
    all-reduce, done by hand where a step runs several backward passes). A parameter no process gave a
    gradient keeps none, as alone. Nothing alone."""
    if not launched():
        return
    has_grad = [torch.ones(1, device=p.device) if p.grad is not None else torch.zeros(1, device=p.device)
                for p in parameters]
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in parameters]
    summed = sum_(torch.cat(has_grad + grads))
    offset = len(parameters)
    for k, p in enumerate(parameters):
        n = p.numel()
        p.grad = summed[offset:offset + n].view_as(p).to(p.dtype).clone() if summed[k] > 0 else None
        offset += n


def batch_shares(local_counts: Sequence[float]) -> list[float]:
    """Per loss term, this process's share of the global batch (its count over every process's) — the
    factor that turns a local mean into its part of the global mean. Exactly 1.0 alone (0 where no process
    has any unit of the term)."""
    if not launched():
        return [1.0] * len(local_counts)
    totals = sum_(torch.tensor([float(c) for c in local_counts], dtype=torch.float64)).tolist()
    return [float(c) / t if t else 0.0 for c, t in zip(local_counts, totals)]
