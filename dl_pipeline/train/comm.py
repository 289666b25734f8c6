"""The few collectives training needs, over Horovod or a single process (executor-side)."""

from __future__ import annotations


class Comm:
    """allreduce (sum, average), broadcast of objects and parameters, wrapping an optimizer.

    One process: every collective is the identity. Horovod: Gloo on CPU, NCCL on GPU; sparse
    gradients (the fastText embedding) are exchanged by allgather inside its optimizer.
    """

    def __init__(self, use_horovod: bool):
        self.hvd = None
        if use_horovod:
            import horovod.torch as hvd

            hvd.init()
            self.hvd = hvd
        self.rank = self.hvd.rank() if self.hvd else 0
        self.size = self.hvd.size() if self.hvd else 1
        self.local_rank = self.hvd.local_rank() if self.hvd else 0
        self.local_size = self.hvd.local_size() if self.hvd else 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, tensor, name: str):
        if not self.hvd:
            return tensor
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name)

    def average_(self, tensor, name: str) -> None:
        if self.hvd:
            self.hvd.allreduce_(tensor, op=self.hvd.Average, name=name)

    def broadcast_object(self, obj, name: str):
        return self.hvd.broadcast_object(obj, root_rank=0, name=name) if self.hvd else obj

    def broadcast_model(self, model, optimizer=None) -> None:
        if self.hvd:
            self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            if optimizer is not None:
                self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def distributed_optimizer(self, optimizer, model, fp16: bool):
        if not self.hvd:
            return optimizer
        compression = self.hvd.Compression.fp16 if fp16 else self.hvd.Compression.none
        return self.hvd.DistributedOptimizer(optimizer, compression=compression,
                                             named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad])
