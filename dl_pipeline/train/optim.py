"""Adam that also takes sparse gradients (lazy updates of the touched embedding rows).

Why: the fastText embedding (2^17 x 32 floats = 16 MB) dominates the model. With dense gradients
every step allreduces all 16 MB; with ``EmbeddingBag(sparse=True)`` Horovod allgathers only the
rows a batch touched (~1% of them), which is what lets data parallelism pay off on CPUs. Torch's
Adam refuses sparse gradients and SparseAdam refuses dense ones, and ``hvd.DistributedOptimizer``
rebuilds the optimizer class from its param groups, so one class must handle both.
Dense parameters get exactly ``torch.optim.Adam``'s update; sparse ones the SparseAdam update.
"""

from __future__ import annotations

import math

import torch


class MixedAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                bc1 = 1 - beta1 ** state["step"]
                bc2 = 1 - beta2 ** state["step"]
                step_size = group["lr"] * math.sqrt(bc2) / bc1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                grad = p.grad
                if grad.is_sparse:
                    rows, summed = sparse_rows(grad)
                    m_rows = m.index_select(0, rows).mul_(beta1).add_(summed, alpha=1 - beta1)
                    v_rows = v.index_select(0, rows).mul_(beta2).addcmul_(summed, summed, value=1 - beta2)
                    m.index_copy_(0, rows, m_rows)
                    v.index_copy_(0, rows, v_rows)
                    # rows are distinct: read, update, write back. index_add_ runs as scatter_add on
                    # CPU (0.37 ms for 12k x 32) where index_select + index_copy_ take 0.19 ms.
                    update = m_rows.div_(v_rows.sqrt_().add_(group["eps"] * math.sqrt(bc2))).mul_(-step_size)
                    p.index_copy_(0, rows, p.index_select(0, rows).add_(update))
                    continue
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                p.addcdiv_(m, v.sqrt().add_(group["eps"] * math.sqrt(bc2)), value=-step_size)
        return loss


def sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse [V, D] gradient -> (distinct row ids [U] int64, their summed rows [U, D]).

    What ``grad.coalesce()`` computes, about twice as fast (one unique + one index_add, no
    sparse-tensor bookkeeping); ``index_select``/``index_copy_`` on the result beat ``t[idx]``
    indexing several times over on CPU (measured in bench/train_bench.py's ceiling).
    """
    idx, val = grad._indices()[0], grad._values()
    # Strictly increasing ids are distinct rows already summed: models._BagMean's gradient (whose
    # is_coalesced flag autograd's AccumulateGrad drops). ~20 us, against ~1.8 ms to coalesce.
    if grad.is_coalesced() or len(idx) < 2 or bool((idx[1:] > idx[:-1]).all()):
        return idx, val
    rows, inverse = torch.unique(idx, return_inverse=True)
    return rows, val.new_zeros((len(rows), val.shape[1])).index_add_(0, inverse, val)


def sparse_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters that get sparse gradients (``sparse=True`` embeddings)."""
    out = set()
    for m in model.modules():
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse:
            out.update(id(p) for p in m.parameters(recurse=False))
    return out


def build_optimizer(spec, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer a RankSpec names, over ``model``'s trainable parameters (frozen ones, see
    ``train.freeze``, get none), one group per (sparse, LR scale).

    ``sgd``: plain SGD on sparse embeddings (fastText's own optimizer: each step touches only
    the rows a batch used; a momentum buffer would make it dense), ``spec.momentum`` and weight
    decay on the dense rest. ``adam``: MixedAdam (lazy updates of touched embedding rows).
    ``lr_scale``: ``train.body_lr_factor`` for a warm-started body (transfer.py), else 1.
    """
    from dl_pipeline.train.transfer import lr_scale_of

    sparse = sparse_parameters(model)
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (id(p) in sparse, lr_scale_of(name, spec.model_spec["name"], spec.transfer))
            groups.setdefault(key, []).append(p)
    if spec.optimizer == "adam":
        return MixedAdam([{"params": ps, "lr_scale": scale} for (_, scale), ps in groups.items()],
                         lr=spec.peak_lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD([{"params": ps, "lr_scale": scale, **({"momentum": 0.0, "weight_decay": 0.0} if is_sparse else {})}
                            for (is_sparse, scale), ps in groups.items()],
                           lr=spec.peak_lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
