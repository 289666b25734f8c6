"""Models, built from a JSON-able spec so a bundle can rebuild them without pickled code.

Each model takes the batch dict produced by the data loader and reads its own feature:
  * ``fasttext``  token_ids [N] + token_offsets [B]     -> logits [B, K]   (Joulin et al. 2017)
                  (the real ids of B rows end to end, see ``bag_inputs``), or tokens [B, T]
                  with length [B], or tokens [B, T] alone (0 = pad)
  * ``lstm``      seq [B, W] + seq_length [B] (the rows' unigram ids in text order, see
                  ``sequence_inputs``), or tokens [B, T] with words [B] -> logits [B, K]
  * ``char_cnn``  chars  int64 [B, L] (0 = unknown/pad) -> logits [B, K]   (Zhang et al. 2015)
  * ``cnn``       image  uint8 [B, H, W, C]             -> logits [B, K]   (LeNet-5 style)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

FEATURE_OF = {"fasttext": "tokens", "lstm": "tokens", "char_cnn": "chars", "cnn": "image"}
# The stored columns each model reads (besides ``label``): the feature and what delimits it.
INPUTS = {"fasttext": ("tokens", "length"), "lstm": ("tokens", "words"), "char_cnn": ("chars",), "cnn": ("image",)}
# Each model's top-level parts (``train.freeze`` names them) and its classifier head: the
# parameters whose shape depends on the classes, rebuilt when a warm start changes the labels.
PARTS = {"fasttext": ("embedding", "fc"), "lstm": ("embedding", "lstm", "fc"), "char_cnn": ("convs", "fc"),
         "cnn": ("features", "fc")}
HEAD = {"fasttext": "fc.", "lstm": "fc.", "char_cnn": "fc.6.", "cnn": "fc.5."}


class FastText(nn.Module):
    def __init__(self, num_buckets: int, embed_dim: int, num_classes: int, sparse: bool = False):
        super().__init__()
        # +1: index 0 is padding, excluded from the bag mean. Sparse gradients touch only the
        # rows a batch uses: far less to allreduce than the whole table (see train/optim.py).
        self.embedding = nn.EmbeddingBag(num_buckets + 1, embed_dim, mode="mean", padding_idx=0, sparse=sparse)
        self.fc = nn.Linear(embed_dim, num_classes)
        nn.init.uniform_(self.embedding.weight, -1.0 / embed_dim, 1.0 / embed_dim)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "token_ids" not in batch and "length" in batch:
            batch = bag_inputs(batch["tokens"], batch["length"])
        if "token_ids" in batch:  # no work on padding: each bag is its row's real ids
            return self.fc(self._bags(batch))
        return self.fc(self.embedding(batch["tokens"].long()))

    def _bags(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean embedding of each row's real ids, [B, D]. Real ids are never 0, so this
        skips ``padding_idx``, which sends torch's CPU kernel down a path ~10x slower (1.2 vs
        0.1 ms for 24k ids). With the batch's distinct ids known (``token_rows``, made ahead by
        the data thread), the backward hands the optimizer an already coalesced gradient."""
        weight = self.embedding.weight
        if "token_rows" in batch and self.embedding.sparse and weight.requires_grad and torch.is_grad_enabled():
            return _BagMean.apply(weight, batch["token_ids"], batch["token_offsets"],
                                  batch["token_rows"], batch["token_row_bags"], batch["token_row_offsets"])
        return F.embedding_bag(batch["token_ids"], weight, batch["token_offsets"], mode="mean",
                               sparse=self.embedding.sparse)


class _BagMean(torch.autograd.Function):
    """``embedding_bag(mode="mean")`` whose backward is a coalesced sparse [V, D] gradient over
    the batch's distinct rows (the same values torch's sparse backward gives, after
    ``coalesce``), summed by one more ``embedding_bag``: row u's gradient is the sum, over the
    bags b it occurs in (with multiplicity), of grad_out[b] / length[b], so with the
    occurrences grouped by row (``bag_groups``, made by the data thread) it is a weighted bag
    sum over grad_out [B, D]. Measured at batch 256 (24k ids, 12k distinct): 0.12 ms against
    1.3 ms for the per-id rows + ``index_add_`` it replaces (torch runs that as scatter_add)."""

    @staticmethod
    def forward(ctx, weight, ids, offsets, rows, row_bags, row_offsets):
        ctx.save_for_backward(offsets, rows, row_bags, row_offsets)
        ctx.shape = weight.shape
        ctx.n = len(ids)
        return F.embedding_bag(ids, weight, offsets, mode="mean")

    @staticmethod
    def backward(ctx, grad_out):
        offsets, rows, row_bags, row_offsets = ctx.saved_tensors
        lengths = torch.diff(offsets.long(), append=torch.tensor([ctx.n], device=offsets.device))
        weights = lengths.clamp(min=1).to(grad_out.dtype).reciprocal()[row_bags]
        summed = F.embedding_bag(row_bags, grad_out.contiguous(), row_offsets, mode="sum", per_sample_weights=weights)
        grad = torch.sparse_coo_tensor(rows.unsqueeze(0), summed, ctx.shape, is_coalesced=True, check_invariants=False)
        return grad, None, None, None, None, None


def bag_inputs(tokens, length, distinct: bool = False) -> dict:
    """Padded ids int32 [B, T] + real lengths int32 [B] -> {token_ids [N = sum(length)],
    token_offsets [B]}, both int32: the input ``EmbeddingBag`` takes with offsets, with no padding
    to gather, scatter or update. Rows are stored with their real ids first
    (``features.hash_tokens``). Takes numpy arrays (the data thread: ~7x faster than torch's
    boolean indexing on CPU) or torch tensors (scoring, on any device) and returns the same kind.
    ``distinct`` (numpy only) adds what training's backward wants (see ``bag_groups``)."""
    xp = torch if isinstance(tokens, torch.Tensor) else np
    cols = torch.arange(tokens.shape[1], device=tokens.device) if xp is torch else np.arange(tokens.shape[1])
    mask = cols < length[:, None]
    offsets = xp.zeros_like(tokens[:, 0])
    if len(length) > 1:
        offsets[1:] = xp.cumsum(length[:-1], 0)
    out = {"token_ids": tokens[mask], "token_offsets": offsets}
    if distinct:
        out.update(bag_groups(out["token_ids"], out["token_offsets"]))
    return out


def bag_groups(ids: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
    """A batch's ids [N] in bags starting at ``offsets`` [B] -> its distinct ids and, for each,
    the bags it occurs in, grouped (what ``_BagMean.backward`` sums over):
    ``token_rows`` int64 [U] the distinct ids ascending; ``token_row_bags`` int64 [N] the bag of
    every occurrence, ordered by id (stable); ``token_row_offsets`` int64 [U] where each id's
    group starts. One stable sort of the ids, as radix passes over 16-bit digits (numpy sorts
    integers of <= 16 bits by radix): ~0.3 ms for 24k ids at batch 256, in the data thread,
    against ~1.2 ms for a comparison sort of the int32 ids."""
    n = len(ids)
    bags = np.repeat(np.arange(len(offsets)), np.diff(offsets, append=n))
    order = np.argsort(ids.astype(np.uint16), kind="stable")  # the low 16 bits (astype wraps)
    high = ids[order] >> 16
    top = int(high.max()) if n else 0
    if top == 1:  # ids up to 2^17 (the default buckets): a stable partition on the 17th bit
        low = high == 0
        order = np.concatenate([order[low], order[~low]])
    elif top > 1:  # more buckets: a second radix pass on the high digit
        order = order[np.argsort(high.astype(np.uint16), kind="stable")]
    ordered = ids[order]
    first = np.empty(n, dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return {"token_rows": ordered[starts].astype(np.int64), "token_row_bags": bags[order], "token_row_offsets": starts}


class LSTMClassifier(nn.Module):
    """A (bi)LSTM over each row's word unigrams in text order, packed (no step runs on
    padding); the last layer's final hidden states (both directions) -> dropout -> linear.
    The embedding shares fastText's hashed vocabulary and, with ``sparse``, its sparse
    gradients (Adam updates only the rows a batch used; Horovod allgathers only those)."""

    def __init__(self, num_buckets: int, embed_dim: int, hidden: int, layers: int, bidirectional: bool, num_classes: int,
                 dropout: float = 0.5, sparse: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets + 1, embed_dim, padding_idx=0, sparse=sparse)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional,
                            dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "seq" not in batch:
            batch = sequence_inputs(batch["tokens"], batch["words"])
        x = self.embedding(batch["seq"].long())  # [B, W, E]
        packed = nn.utils.rnn.pack_padded_sequence(x, batch["seq_length"].cpu().long(), batch_first=True,
                                                   enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: [layers * directions, B, H]
        last = torch.cat([h[-2], h[-1]], dim=1) if self.lstm.bidirectional else h[-1]
        return self.fc(self.dropout(last))


def sequence_inputs(tokens, words) -> dict:
    """Stored ids [B, T] (unigrams first, then bigrams: ``features.hash_token_words``) + the
    unigram counts [B] -> {seq [B, W]: each row's unigrams in order, 0 after them; seq_length
    [B]: their counts, at least 1 (an empty row is one padding step, which packing needs)}, W =
    the batch's longest row. numpy (the data thread) or torch (scoring) in, the same kind out."""
    xp = torch if isinstance(tokens, torch.Tensor) else np
    width = max(1, int(words.max())) if len(words) else 1
    cols = torch.arange(width, device=tokens.device) if xp is torch else np.arange(width)
    seq = tokens[:, :width] * (cols < words[:, None])
    lengths = xp.clip(words, 1, None) if xp is np else words.clamp(min=1)
    return {"seq": seq, "seq_length": lengths}


class CharCNN(nn.Module):
    """6 convolutions + 3 fully-connected layers over one-hot characters (Zhang et al. 2015)."""

    def __init__(self, alphabet_size: int, length: int, num_classes: int, size: str = "small", dropout: float = 0.5):
        super().__init__()
        feat, fc = (256, 1024) if size == "small" else (1024, 2048)
        self.alphabet_size = alphabet_size
        self.convs = nn.Sequential(
            nn.Conv1d(alphabet_size, feat, 7), nn.ReLU(), nn.MaxPool1d(3),
            nn.Conv1d(feat, feat, 7), nn.ReLU(), nn.MaxPool1d(3),
            nn.Conv1d(feat, feat, 3), nn.ReLU(),
            nn.Conv1d(feat, feat, 3), nn.ReLU(),
            nn.Conv1d(feat, feat, 3), nn.ReLU(),
            nn.Conv1d(feat, feat, 3), nn.ReLU(), nn.MaxPool1d(3),
        )
        out_len = (length - 96) // 27
        if out_len < 1:
            raise ValueError(f"char_cnn needs features.char_length >= 123, got {length}")
        self.fc = nn.Sequential(
            nn.Linear(out_len * feat, fc), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(fc, fc), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(fc, num_classes),
        )
        for m in self.modules():  # Gaussian init as in the paper
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02 if size == "small" else 0.05)
                nn.init.zeros_(m.bias)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chars = batch["chars"].long()
        x = F.one_hot(chars, self.alphabet_size + 1)[..., 1:].transpose(1, 2).float()  # [B, A, L]
        return self.fc(self.convs(x).flatten(1))


class LeNet(nn.Module):
    def __init__(self, channels: int, height: int, width: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout * 0.5), nn.Linear(64 * (height // 4) * (width // 4), 256), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(256, num_classes),
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["image"].permute(0, 3, 1, 2).float() / 255.0  # [B, C, H, W] in [0, 1]
        return self.fc(self.features(x))


def model_spec(name: str, featurizer: dict[str, Any], num_classes: int, embed_dim: int, char_cnn_size: str, dropout: float,
               sparse_embeddings: bool = False, lstm_hidden: int = 64, lstm_layers: int = 1,
               lstm_bidirectional: bool = True) -> dict[str, Any]:
    """Everything needed to rebuild the model: stored as the bundle's model.json."""
    spec: dict[str, Any] = {"name": name, "num_classes": num_classes, "dropout": dropout}
    if name == "fasttext":
        spec.update(num_buckets=featurizer["tokens"]["buckets"], embed_dim=embed_dim, sparse=sparse_embeddings)
    elif name == "lstm":
        spec.update(num_buckets=featurizer["tokens"]["buckets"], embed_dim=embed_dim, sparse=sparse_embeddings,
                    hidden=lstm_hidden, layers=lstm_layers, bidirectional=lstm_bidirectional)
    elif name == "char_cnn":
        spec.update(alphabet_size=len(featurizer["chars"]["alphabet"]), length=featurizer["chars"]["length"], size=char_cnn_size)
    else:
        im = featurizer["image"]
        spec.update(channels=im["channels"], height=im["height"], width=im["width"])
    return spec


def build_model(spec: dict[str, Any]) -> nn.Module:
    name, k = spec["name"], spec["num_classes"]
    if name == "fasttext":
        return FastText(spec["num_buckets"], spec["embed_dim"], k, spec.get("sparse", False))
    if name == "lstm":
        return LSTMClassifier(spec["num_buckets"], spec["embed_dim"], spec["hidden"], spec["layers"], spec["bidirectional"], k,
                              spec["dropout"], spec.get("sparse", False))
    if name == "char_cnn":
        return CharCNN(spec["alphabet_size"], spec["length"], k, spec["size"], spec["dropout"])
    if name == "cnn":
        return LeNet(spec["channels"], spec["height"], spec["width"], k, spec["dropout"])
    raise ValueError(f"unknown model {name!r}")
