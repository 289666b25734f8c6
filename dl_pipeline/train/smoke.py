"""A cluster check: every rank allreduces ``rank + 1``; all must see ``size * (size + 1) / 2``.

    import horovod.spark; horovod.spark.run(allreduce_check, num_proc=N, use_gloo=True)
"""

from __future__ import annotations


def allreduce_check() -> tuple[int, int, float]:
    """-> (rank, size, allreduced sum), run inside a Horovod rank."""
    import horovod.torch as hvd
    import torch

    hvd.init()
    value = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum, name="allreduce_check")
    return hvd.rank(), hvd.size(), float(value[0])
