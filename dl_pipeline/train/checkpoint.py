"""Checkpoints that load no code: tensors in safetensors, everything else as JSON (rank 0 writes).

``<run_dir>/checkpoints/``::

    latest.safetensors   model weights ("model.<name>"), optimizer tensors ("optim.<i>.<key>"),
                         the torch and numpy RNG states as uint8/uint32 tensors; the loop state,
                         the optimizer's other values and Python's RNG state as JSON in the
                         file's metadata ("dl_pipeline": {...})
    best.safetensors     the weights with the lowest val loss so far ("model.<name>")

Each file is written under a temporary name and renamed, so a crash leaves the previous one
whole. Loading parses safetensors (a JSON header and raw tensor bytes) and JSON only: nothing in
a checkpoint can run code. A file that is not one of ours (a pickle, a foreign safetensors file,
an old ``latest.pt``) is refused with a ``UserError`` naming it; ``check`` runs on the driver
before any rank starts, so ``--resume`` on such a run dir stops with one line and exit 2.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np

from dl_pipeline.errors import UserError

FORMAT = "dl_pipeline.checkpoint/1"
LATEST, BEST = "latest.safetensors", "best.safetensors"
LEGACY = ("latest.pt", "best.pt")  # pickles written before format 1: never loaded


def _path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, "checkpoints", name)


def _write(path: str, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
              metadata={"dl_pipeline": json.dumps({"format": FORMAT, **meta})})
    os.replace(tmp, path)  # a crash leaves the previous checkpoint whole


def _read(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (tensors, our metadata); UserError if ``path`` is not a checkpoint of ours."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("dl_pipeline", "{}"))
            if meta.get("format") != FORMAT:
                raise ValueError("no dl_pipeline checkpoint metadata")
            return {k: fh.get_tensor(k) for k in fh.keys()}, meta
    except (SafetensorError, ValueError, OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a dl_pipeline checkpoint ({str(exc).splitlines()[0][:120]}); "
                        "nothing in it was run: delete it, or train without --resume") from None


def describe(run_dir: str) -> str:
    """One phrase for a failure message: where a ``--resume`` would continue from."""
    path = _path(run_dir, LATEST)
    if not os.path.exists(path):
        return "no checkpoint yet (a restart begins at step 0)"
    try:
        state = _read(path)[1]["state"]
    except UserError:
        return f"{path} is not readable as a checkpoint"
    return f"last checkpoint: step {state['global_step']} (epoch {state['epoch']}) in {path}"


# A run's plan (what its schedule is cut by) -> the key that sets it, for the resume check.
PLAN_KEYS = {"steps_per_epoch": "train.steps_per_epoch", "epochs": "train.epochs", "batch_size": "train.batch_size",
             "world_size": "train.num_proc"}


def plan_of(spec) -> dict[str, int]:
    """What a RankSpec's step numbering and LR schedule depend on; a checkpoint resumes only
    under the same plan (the recipe sizes these from the data, so a changed dataset, world size
    or version could otherwise move the schedule under a resumed run)."""
    return {k: int(getattr(spec, k)) for k in PLAN_KEYS}


def check(run_dir: str, plan: dict[str, int] | None = None) -> str | None:
    """Driver-side check before ``--resume``: the latest checkpoint's path if there is one of
    ours, None if there is none; UserError for anything else (e.g. a pickle ``latest.pt``, or a
    checkpoint written under another ``plan``)."""
    for name in LEGACY:
        if os.path.exists(_path(run_dir, name)):
            raise UserError(f"{_path(run_dir, name)}: a pickle checkpoint (it could run code when loaded), refused; "
                            "delete it and train again without --resume")
    path = _path(run_dir, LATEST)
    if not os.path.exists(path):
        return None
    _, meta = _read(path)
    saved = (meta.get("state") or {}).get("plan")
    for key, setting in PLAN_KEYS.items():
        if plan and saved and key in saved and saved[key] != plan[key]:
            raise UserError(f"{path}: written by a run with {key} {saved[key]}, this run has {plan[key]}: resume with the "
                            f"same settings (--set {setting}={saved[key]}) or train again without --resume")
    best = _path(run_dir, BEST)
    if os.path.exists(best):
        _read(best)
    return path


def _optimizer_parts(optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """optimizer.state_dict() -> (tensors by "optim.<param>.<key>", JSON-able rest)."""
    import torch

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in doc["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": doc["param_groups"]}


def save(run_dir: str, model, optimizer, state: dict[str, Any]) -> None:
    """checkpoints/latest.safetensors: model, optimizer, loop ``state`` (JSON-able), RNG states."""
    import torch

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {"state": state, "optimizer": None}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_parts(optimizer)
        tensors.update(opt_tensors)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, pstate, pgauss = random.getstate()
    meta["rng"] = {"numpy": [name, int(pos), int(has_gauss), float(gauss)], "python": [version, list(pstate), pgauss]}
    _write(_path(run_dir, LATEST), tensors, meta)


def load_latest(run_dir: str, model, optimizer) -> dict[str, Any] | None:
    """Restore model, optimizer and RNG states from latest.safetensors; returns the loop state,
    or None when there is no checkpoint."""
    import torch

    path = _path(run_dir, LATEST)
    if not os.path.exists(path):
        return None
    tensors, meta = _read(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None and meta.get("optimizer"):
        optimizer.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
    torch.set_rng_state(tensors["rng.torch"])
    name, pos, has_gauss, gauss = meta["rng"]["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().view(np.uint32), pos, has_gauss, gauss))
    version, pstate, pgauss = meta["rng"]["python"]
    random.setstate((version, tuple(pstate), pgauss))
    return meta["state"]


def save_best(run_dir: str, model) -> None:
    _write(_path(run_dir, BEST), {f"model.{k}": v for k, v in model.state_dict().items()}, {})


def load_best(run_dir: str, model) -> bool:
    """Load best.safetensors into ``model`` if it exists; returns whether it did."""
    path = _path(run_dir, BEST)
    if not os.path.exists(path):
        return False
    tensors, _ = _read(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return True
