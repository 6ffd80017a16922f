"""Cross-rank helpers: losses see the global batch; gradients still come out right under DDP;
the ranks' shares of an evaluation reach rank 0 through host memory.

Why the local slot's gradient is scaled by the world size: every rank computes the same loss L
on the gathered batch, but only its own slice carries a graph, so rank r's backward yields
dL/de_r (d e_r / d theta). DDP *averages* gradients over ranks, which would give 1/W of the
full-batch gradient; scaling the local slice's gradient by W undoes that. Learned loss
parameters (proxies, centers) see the whole batch on every rank, so their gradient is already
the full one on each rank and DDP's average leaves it unchanged: they must not be scaled,
which is why the scaling sits on the gathered embeddings and not on the loss.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `scale` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks in rank order; only the local slice keeps its graph.

    Every rank must pass a tensor of the same shape (planned sub-batches guarantee it).
    """
    rank, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = _ScaleGradient.apply(x, float(size))
    return torch.cat(parts)


def gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor without gradient (labels, ids) from all ranks in rank order."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def mean_across_ranks(value: float, device: torch.device) -> float:
    """The mean of a Python number over ranks (for logging only)."""
    _, size = world()
    if size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / size


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (a collective: every rank must call it)."""
    _, size = world()
    if size == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_gather_objects(obj) -> list:
    """Every rank's small picklable `obj`, in rank order, on every rank (a collective), over the
    host group (`_host_group`)."""
    _, size = world()
    if size == 1:
        return [obj]
    received = [None] * size
    dist.all_gather_object(received, obj, group=_host_group())
    return received


def send_to_rank0(array: np.ndarray) -> None:
    """Send an array to rank 0, which takes it with `receive_on_rank0`, through host memory.

    Over gloo: over NCCL a whole evaluation split's embeddings would pass through rank 0's GPU,
    beside the training state. Only after an `all_gather_objects` (a collective, which makes
    the host group on every rank: the ranks that send or receive could not make it alone)."""
    dist.send(torch.from_numpy(np.ascontiguousarray(array)), dst=0, group=_host_group())


def receive_on_rank0(src: int, shape: tuple, dtype: np.dtype | str) -> np.ndarray:
    """Rank 0: the array rank `src` sends with `send_to_rank0`, of the shape and dtype it said
    (after an `all_gather_objects`, as for `send_to_rank0`)."""
    array = np.empty(shape, dtype)
    dist.recv(torch.from_numpy(array), src=src, group=_host_group())
    return array


_HOST_GROUP = None


def _host_group():
    """A gloo group of every rank (the default group itself when it is gloo); made on first use,
    which every rank reaches together (`new_group` is a collective)."""
    global _HOST_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def buffers_from_rank0(module: torch.nn.Module) -> None:
    """Overwrite `module`'s buffers (BatchNorm's running statistics) with rank 0's (a
    collective). Under DDP each rank updates them from its own sub-batch after rank 0's copy
    reaches it at the start of a forward, so after a step the ranks hold different ones."""
    _, size = world()
    if size == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)
