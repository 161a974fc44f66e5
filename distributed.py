"""Several processes under torchrun (PyTorch's own launcher; there is no other):

    torchrun --nproc_per_node N multitask_classifier.py [--flags]        one machine, N GPUs (or N CPU processes)
    torchrun --nnodes M --node_rank R --rdzv_endpoint HOST:PORT --nproc_per_node N multitask_classifier.py ...

How the work is split (`Distributed`): every rank draws the same global batch of `world * --batch_size`
examples of the same task at each step (the same schedule and batch streams, seeded alike) and trains
on its own contiguous slice of it; each slice's loss is weighted by its share of the global batch, so
summing the gradients over ranks (one all-reduce per task and step, after that task's micro-batches:
none between them) gives exactly the gradient of the global batch's mean. Sophia's curvature
estimates are summed the same way; gradient surgery projects the all-reduced task gradients, so every
rank applies the same update. Dropout and the techniques' own random draws differ per rank; the task
schedule, the batch streams and the surgery order do not. Evaluation splits each dev/test set's
batches over the ranks and gathers the predictions. Rank 0 alone prints, logs and writes files.

With one process (`WORLD_SIZE` unset or 1) every method is a no-op and nothing is initialised.
"""
import atexit
import dataclasses
import os
import sys
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that prints, logs and writes files."""
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's contiguous slice of a global batch (empty when the batch has fewer rows than ranks)."""
        size = -(-len(indices) // self.world)  # ceil
        return indices[self.rank * size:(self.rank + 1) * size]

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """p.grad <- the sum over ranks of p.grad, in one flat all-reduce. A parameter no rank has a
        gradient for keeps grad None (the optimiser then skips it, as in one process); one that only
        some ranks have counts as zeros on the others."""
        if self.world > 1:
            for p, summed in zip(params, self.sum_estimates([p.grad for p in params], params)):
                p.grad = summed

    def sum_estimates(self, tensors: list[torch.Tensor | None], params: list[torch.Tensor]) -> list:
        """The sum over ranks of per-parameter tensors (gradients, Sophia's Hessian estimates), None
        where no rank has one."""
        if self.world == 1:
            return tensors
        device = params[0].device if params else torch.device("cpu")
        present = torch.tensor([t is not None for t in tensors], dtype=torch.int32, device=device)
        dist.all_reduce(present)
        used = [i for i, n in enumerate(present.tolist()) if n > 0]
        if not used:
            return tensors
        flat = torch.cat([(tensors[i] if tensors[i] is not None else torch.zeros_like(params[i])).reshape(-1).float()
                          for i in used])  # (numel of the used parameters,)
        dist.all_reduce(flat)
        summed, offset = list(tensors), 0
        for i in used:
            n = params[i].numel()
            summed[i] = flat[offset:offset + n].view_as(params[i]).to(params[i].dtype).clone()
            offset += n
        return summed

    def sum_value(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor summed over ranks (one all-reduce; the value itself with one process)."""
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (pickled; for evaluation results)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, work: Callable[[], T]) -> T:
        """`work()` run by rank 0 alone (checks and writes of the run folder), its result on every rank. An
        exception it raises is raised on every rank, so that no rank waits in a collective for one that
        has stopped (an input error then ends every process with status 2, not a hang until the timeout)."""
        if self.world == 1:
            return work()
        error, failure, result = None, None, None
        if self.main:
            try:
                result = work()
            except Exception as e:  # every rank is told before any rank raises
                error, failure = e, (type(e), str(e))  # the class and message pickle where e may not
        failure, result = self.broadcast((failure, None if failure else result))
        if error is not None:
            raise error
        if failure is not None:
            kind, message = failure
            raise kind(message)
        return result

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (a stop signal that reached some ranks only)."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_cpu_group())
        return bool(value.item())


_CPU_GROUP = None


def _cpu_group():
    """A gloo group for small CPU-side flags (the default group may be NCCL, which needs CUDA tensors)."""
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _CPU_GROUP


def _leave():
    """Every rank waits for the others, then leaves the group (atexit, and `exit_process`)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """Under torchrun: wait for every rank, leave the group, flush, and end this process with `code`
    at once (os._exit), skipping the interpreter's teardown: there, C++ threads of a gloo group can
    still abort a process that has finished and written everything (SIGABRT, "terminate called
    without an active exception"; pytorch/pytorch#179291). Every file must be closed before. With one
    process it does nothing and returns."""
    if not dist.is_initialized():
        return
    _leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def init_distributed(device_name: str) -> tuple[Distributed, str]:
    """(the ranks' layout, the device name this rank uses). Under torchrun (WORLD_SIZE > 1) it joins
    the process group: NCCL with one GPU per local rank, gloo on CPUs; other ranks' stdout goes to
    /dev/null so that rank 0 alone prints."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    # Leave the group before the interpreter exits on every path (a run's normal end calls exit_process).
    atexit.register(_leave)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    return Distributed(rank, world, local_rank), f"cuda:{local_rank}" if cuda else "cpu"
