"""The few collectives training needs (executor-side), over one process, Horovod or
``torch.distributed``.

``open_comm(kind)`` gives one of three with the same methods: allreduce (sum, average),
broadcast of objects and of the model (and optimizer) state, barrier, and wrapping an optimizer
so its gradients are averaged across ranks before each step.

Sparse gradients (the fastText embedding: ~1% of its rows per batch) are exchanged by
allgather of (row ids, row values) on every backend: Horovod does it inside its optimizer, and
``TorchComm`` does the same itself because NCCL has no sparse allreduce (Gloo has one, but one
code path for CPU and GPU is worth more than Gloo's few ms). Dense gradients are flattened into
one buffer and allreduced once per step.
"""

from __future__ import annotations

import os
from typing import Any


class Comm:
    """One process: every collective is the identity."""

    kind = "none"
    rank, size, local_rank, local_size = 0, 1, 0, 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1 or self.kind != "none"

    def allreduce_sum(self, tensor, name: str):
        return tensor

    def average_(self, tensor, name: str) -> None:
        pass

    def broadcast_object(self, obj, name: str):
        return obj

    def broadcast_model(self, model, optimizer=None) -> None:
        pass

    def barrier(self) -> None:
        pass

    def distributed_optimizer(self, optimizer, model, fp16: bool):
        return optimizer

    def conclude(self, result):
        """The rank's return value at the end of training (``result``: rank 0's metrics, None
        elsewhere); the communication is closed after it."""
        return result


class HorovodComm(Comm):
    """Horovod: Gloo on CPU, NCCL on GPU; sparse gradients allgathered inside its optimizer."""

    kind = "horovod"

    def __init__(self):
        import horovod.torch as hvd

        hvd.init()
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()

    def allreduce_sum(self, tensor, name: str):
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name)

    def average_(self, tensor, name: str) -> None:
        self.hvd.allreduce_(tensor, op=self.hvd.Average, name=name)

    def broadcast_object(self, obj, name: str):
        return self.hvd.broadcast_object(obj, root_rank=0, name=name)

    def broadcast_model(self, model, optimizer=None) -> None:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        if optimizer is not None:
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def barrier(self) -> None:
        self.hvd.allreduce(self._zero(), name="barrier")

    @staticmethod
    def _zero():
        import torch

        return torch.zeros(1)

    def distributed_optimizer(self, optimizer, model, fp16: bool):
        compression = self.hvd.Compression.fp16 if fp16 else self.hvd.Compression.none
        return self.hvd.DistributedOptimizer(optimizer, compression=compression,
                                             named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad])


class TorchComm(Comm):
    """``torch.distributed`` as TorchDistributor or torchrun starts it (MASTER_ADDR, MASTER_PORT,
    RANK, WORLD_SIZE in the environment): NCCL when this rank trains on CUDA, else Gloo.
    Ranks on one host are counted by host name, so threads are shared out as under Horovod."""

    kind = "torch"

    def __init__(self, cuda: bool):
        import socket

        import torch
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        hosts: list[Any] = [None] * self.size
        if cuda:  # NCCL collectives need this rank's device chosen first
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        dist.all_gather_object(hosts, socket.gethostname())
        self.local_rank = hosts[: self.rank].count(hosts[self.rank])
        self.local_size = hosts.count(hosts[self.rank])

    def _on_device(self, tensor):
        return tensor.to(self.device) if tensor.device != self.device else tensor

    def allreduce_sum(self, tensor, name: str):
        out = self._on_device(tensor.clone())
        self.dist.all_reduce(out)
        return out.to(tensor.device)

    def average_(self, tensor, name: str) -> None:
        out = self._on_device(tensor)
        self.dist.all_reduce(out)
        out.div_(self.size)
        if out is not tensor:
            tensor.copy_(out)

    def broadcast_object(self, obj, name: str):
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_model(self, model, optimizer=None) -> None:
        for tensor in model.state_dict().values():
            out = self._on_device(tensor)
            self.dist.broadcast(out, src=0)
            if out is not tensor:
                tensor.copy_(out)
        if optimizer is not None:
            state = self.broadcast_object(optimizer.state_dict() if self.is_root else None, "optimizer")
            if not self.is_root:
                optimizer.load_state_dict(state)

    def barrier(self) -> None:
        self.dist.barrier()

    def distributed_optimizer(self, optimizer, model, fp16: bool):
        from dl_pipeline.train.optim import sparse_parameters

        return AveragedGradients(optimizer, [p for p in model.parameters() if p.requires_grad], self, fp16,
                                 sparse_parameters(model))

    def conclude(self, result):
        """Every rank returns rank 0's result: TorchDistributor has each rank write its return
        value to the same file and hands back whichever landed last. The ranks then leave
        together (a rank tearing its process group down while another still used it aborted)."""
        result = self.broadcast_object(result, "result")
        self.dist.barrier()
        self.dist.destroy_process_group()
        return result


class AveragedGradients:
    """An optimizer whose ``step`` first averages the gradients over the ranks (TorchComm):
    dense ones in one flattened allreduce, sparse ones by allgather of their rows. Everything
    else (param_groups, state, zero_grad, state_dict) is the wrapped optimizer's."""

    def __init__(self, optimizer, params: list, comm: TorchComm, fp16: bool, sparse: set[int]):
        self.optimizer, self.params, self.comm, self.fp16, self.sparse = optimizer, params, comm, fp16, sparse

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)

    def step(self, closure=None):
        self.average_gradients()
        return self.optimizer.step(closure)

    def average_gradients(self) -> None:
        import torch
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        comm = self.comm
        # Every rank must send the same tensors: a parameter this rank's step did not reach
        # (its grad None) contributes zeros, as in Horovod.
        for p in self.params:
            if p.grad is None:
                p.grad = _empty_sparse(p) if id(p) in self.sparse else torch.zeros_like(p)
        dense = [p.grad for p in self.params if not p.grad.is_sparse]
        if dense:
            flat = comm._on_device(_flatten_dense_tensors(dense))
            wire = flat.half() if self.fp16 and flat.is_floating_point() else flat
            comm.dist.all_reduce(wire)
            flat = wire.to(flat.dtype).div_(comm.size)
            for grad, value in zip(dense, _unflatten_dense_tensors(flat, dense), strict=True):
                grad.copy_(value)
        for p in self.params:
            if p.grad.is_sparse:
                p.grad = self._gather_sparse(p.grad).div_(comm.size)

    def _gather_sparse(self, grad):
        """Every rank's rows of a sparse [N, D] gradient, concatenated (not coalesced: the
        optimizer sums a row's copies, as after Horovod's allgather)."""
        import torch

        from dl_pipeline.train.optim import sparse_rows

        comm = self.comm
        ids, values = (comm._on_device(t) for t in sparse_rows(grad))
        counts = [torch.zeros(1, dtype=torch.int64, device=comm.device) for _ in range(comm.size)]
        comm.dist.all_gather(counts, torch.tensor([len(ids)], dtype=torch.int64, device=comm.device))
        most = int(max(c.item() for c in counts))
        pad = most - len(ids)
        ids_p = torch.cat([ids, ids.new_zeros(pad)])
        vals_p = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])
        all_ids = [torch.empty_like(ids_p) for _ in range(comm.size)]
        all_vals = [torch.empty_like(vals_p) for _ in range(comm.size)]
        comm.dist.all_gather(all_ids, ids_p)
        comm.dist.all_gather(all_vals, vals_p)
        n = [int(c.item()) for c in counts]
        rows = torch.cat([a[:k] for a, k in zip(all_ids, n, strict=True)]).to(grad.device)
        vals = torch.cat([a[:k] for a, k in zip(all_vals, n, strict=True)]).to(grad.device)
        return torch.sparse_coo_tensor(rows.unsqueeze(0), vals, grad.shape, check_invariants=False)


def _empty_sparse(p):
    """A sparse gradient with no rows, shaped like the parameter ``p`` [N, D]."""
    import torch

    return torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.int64, device=p.device),
                                   p.new_zeros((0, *p.shape[1:])), p.shape)


def open_comm(kind: str, cuda: bool = False) -> Comm:
    """``none`` (one process), ``horovod`` or ``torch`` (torch.distributed, see TorchComm)."""
    if kind == "horovod":
        return HorovodComm()
    if kind == "torch":
        return TorchComm(cuda)
    return Comm()
