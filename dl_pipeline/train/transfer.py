"""Transfer learning: warm-start a model from a trained bundle (``train.init_from``).

Driver side (``plan``, no torch): the bundle must hold the same model on the same featurizer as
the prepared dataset (a mismatch names the first differing key), the architecture comes from the
bundle, and the head is kept only when the classes are the same (count and names); otherwise a
new head is built for this dataset's classes. Rank side (``warm_start``): load the bundle's
tensors (safetensors, no pickle), freeze ``train.freeze``'s parts, and give the pre-trained body
``train.body_lr_factor`` x the LR (``lr_scale`` of its optimizer group, see optim.py).
"""

from __future__ import annotations

import json
from typing import Any

from dl_pipeline import fsutil
from dl_pipeline.errors import UserError
from dl_pipeline.models import FEATURE_OF, HEAD, PARTS

BUNDLE_DOCS = ("model.json", "featurizer.json", "labels.json", "versions.json")


def _flat(doc: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(doc, dict):
        return {prefix: doc}
    out: dict[str, Any] = {}
    for k in sorted(doc):
        out.update(_flat(doc[k], f"{prefix}.{k}" if prefix else str(k)))
    return out


def featurizer_difference(bundle: dict, dataset: dict, feature: str) -> tuple[str, Any, Any] | None:
    """The first key (dotted) where two featurizer specs differ in what the model sees: the
    kind, the cleaning and the model's own feature (``enabled`` flags aside); None if equal."""
    def part(doc):
        keep = {k: doc.get(k) for k in ("kind", "cleaning", feature)}
        if isinstance(keep.get(feature), dict):
            keep[feature] = {k: v for k, v in keep[feature].items() if k != "enabled"}
        return _flat(keep)

    a, b = part(bundle), part(dataset)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None


def plan(train, model_name: str, manifest: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model spec, transfer record) for ``train.init_from``; UserError (exit 2) on a mismatch."""
    path = train.init_from
    url = fsutil.to_url(path)
    missing = [f for f in (*BUNDLE_DOCS, "model.safetensors") if not fsutil.exists(fsutil.join(url, f))]
    if missing:
        raise UserError(f"train.init_from={path}: not a model bundle (missing {', '.join(missing)}); "
                        "point it at <train.run_dir>/model of a finished run")
    docs = {f: json.loads(fsutil.read_text(fsutil.join(url, f))) for f in BUNDLE_DOCS}
    source = docs["model.json"]
    if source["name"] != model_name:
        raise UserError(f"train.init_from={path}: the bundle holds a {source['name']} model but model.name={model_name}; "
                        f"set model.name={source['name']}")
    diff = featurizer_difference(docs["featurizer.json"], manifest["featurizer"], FEATURE_OF[model_name])
    if diff:
        key, theirs, ours = diff
        raise UserError(f"train.init_from={path}: featurizer differs at {key} (bundle {theirs!r}, {train.data_path} {ours!r}); "
                        "re-run prepare with the bundle's features.* settings, or train without train.init_from")
    parts = PARTS[model_name]
    unknown = [p for p in train.freeze if p not in parts]
    if unknown:
        raise UserError(f"train.freeze: {', '.join(unknown)} is not a part of the {model_name} model (parts: {', '.join(parts)})")
    labels = docs["labels.json"]
    keep_head = (source["num_classes"] == manifest["num_classes"]
                 and list(labels.get("names", [])) == list(manifest["label_names"]))
    spec = {**source, "num_classes": manifest["num_classes"]}
    record = {"bundle": path, "model_version": docs["versions.json"].get("model_version", ""),
              "source_classes": labels.get("names", []), "head": "kept" if keep_head else "new",
              "freeze": list(train.freeze), "body_lr_factor": train.body_lr_factor}
    return spec, record


def warm_start(model, model_name: str, transfer: dict[str, Any]) -> None:
    """Load the bundle's weights into ``model`` (all but a new head) and freeze named parts."""
    from safetensors.torch import load

    fs, p = fsutil.fs_and_path(fsutil.join(fsutil.to_url(transfer["bundle"]), "model.safetensors"))
    with fs.open(p, "rb") as fh:
        state = load(fh.read())
    head = HEAD[model_name]
    if transfer["head"] == "new":
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    stray = [k for k in missing if not k.startswith(head)] + list(unexpected)
    if stray:
        raise ValueError(f"{transfer['bundle']}: its weights do not fit the model: {stray[:5]}")
    for name, param in model.named_parameters():
        if name.split(".", 1)[0] in transfer["freeze"]:
            param.requires_grad_(False)


def lr_scale_of(name: str, model_name: str, transfer: dict[str, Any]) -> float:
    """The LR multiplier of parameter ``name``: ``body_lr_factor`` for the pre-trained body, 1
    for the head and for a model trained from scratch (empty ``transfer``)."""
    if not transfer or name.startswith(HEAD[model_name]):
        return 1.0
    return float(transfer["body_lr_factor"])
