"""Configuration: one frozen dataclass per concern, YAML holding only differences, typed overrides.

A run's config is built in three layers, later wins:

1. the dataclass defaults below;
2. a YAML file (``--config conf/ag_news.yaml``) with only the keys that differ;
3. repeatable ``--set section.key=value`` overrides, parsed as YAML scalars.

Every layer is type-checked against the dataclass annotations; an unknown section or key, a
value of the wrong type, or a missing file raises :class:`UserError` with a one-line message.
Each dataclass validates its own invariants in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from dl_pipeline.errors import UserError

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


# The token hashes the featurizer computes (``features.word64``, ``zlib.crc32``).
TOKEN_HASHES = ("word64", "crc32")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def _one_of(section: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{section}.{key}={value!r}: must be one of {', '.join(allowed)}")


@dataclass(frozen=True)
class DataConfig:
    """Where the raw rows are and how to parse them.

    ``kind`` text: Zhang et al. CSV (``format: zhang_csv``, label first, 1-based) or any
    CSV/JSON/Parquet with named columns. ``kind`` idx: MNIST-style idx files (``train_path`` the
    images, ``train_labels_path`` the labels). ``kind`` image_folder: one sub-folder per class.
    """

    kind: str = "text"
    format: str = "zhang_csv"
    train_path: str = ""
    test_path: str = ""
    train_labels_path: str = ""
    test_labels_path: str = ""
    num_fields: int = 3
    text_columns: tuple[str, ...] = ("title", "text")
    label_column: str = "label"
    label_base: int = 1
    num_classes: int = 0
    label_names: tuple[str, ...] = ()
    multiline: bool = False
    encoding: str = "UTF-8"
    invalid_utf8: str = "reject"
    title_separator: str = ". "
    max_text_chars: int = 200_000
    image_height: int = 28
    image_width: int = 28
    image_channels: int = 1

    def __post_init__(self) -> None:
        _one_of("data", "kind", self.kind, ("text", "idx", "image_folder"))
        _one_of("data", "format", self.format, ("zhang_csv", "csv", "json", "parquet"))
        _one_of("data", "invalid_utf8", self.invalid_utf8, ("reject", "replace"))
        _require(2 <= self.num_fields <= 4, f"data.num_fields={self.num_fields}: Zhang CSV files have 2, 3 or 4 fields")
        _require(self.num_classes >= 0, "data.num_classes must be >= 0 (0 = infer from the data)")
        _require(
            not self.label_names or self.num_classes in (0, len(self.label_names)),
            f"data.label_names has {len(self.label_names)} names but data.num_classes={self.num_classes}",
        )
        _require(self.max_text_chars > 0, "data.max_text_chars must be > 0")
        _require(self.image_channels in (1, 3), "data.image_channels must be 1 (grey) or 3 (RGB)")
        _require(self.image_height > 0 and self.image_width > 0, "data.image_height/width must be > 0")


@dataclass(frozen=True)
class FeaturesConfig:
    """Featurizer spec: Zhang character quantization and hashed word n-grams (fastText-style)."""

    chars: bool = True
    char_length: int = 1014
    alphabet: str = "abcdefghijklmnopqrstuvwxyz0123456789-,;.!?:'\"/\\|_@#$%^&*~`+-=<>()[]{}\n"
    reverse_chars: bool = True
    tokens: bool = True
    hash_buckets: int = 1 << 17
    ngrams: int = 2
    max_tokens: int = 256
    # word64 (featurizer version 2; ~3x cheaper a token) or crc32 (version 1's ids: to
    # fine-tune from a bundle trained on them, train.init_from). TOKEN_HASHES lists them.
    token_hash: str = "word64"

    def __post_init__(self) -> None:
        _require(self.char_length > 0, "features.char_length must be > 0")
        _require(len(self.alphabet) < 255, "features.alphabet must have fewer than 255 characters")
        _require(0 < self.hash_buckets < 2**31, "features.hash_buckets must be in 1..2147483647 (ids are int32)")
        _require(self.ngrams in (1, 2), "features.ngrams must be 1 (unigrams) or 2 (unigrams + bigrams)")
        _require(self.max_tokens > 0, "features.max_tokens must be > 0")
        _one_of("features", "token_hash", self.token_hash, TOKEN_HASHES)


@dataclass(frozen=True)
class ShardConfig:
    """How prepared rows are split and laid out for N training workers."""

    val_fraction: float = 0.05
    test_fraction: float = 0.0
    max_workers: int = 8
    row_groups_per_worker: int = 4
    row_group_mb: int = 64
    seed: int = 42

    def __post_init__(self) -> None:
        _require(0.0 <= self.val_fraction < 1.0, "shard.val_fraction must be in [0, 1)")
        _require(0.0 <= self.test_fraction < 1.0, "shard.test_fraction must be in [0, 1)")
        _require(self.val_fraction + self.test_fraction < 1.0, "shard.val_fraction + shard.test_fraction must be < 1")
        _require(self.max_workers >= 1, "shard.max_workers must be >= 1")
        _require(self.row_groups_per_worker >= 1, "shard.row_groups_per_worker must be >= 1")
        # A row group is built as one Arrow array per column (int32 offsets: < 2 GiB) and read
        # whole by each training reader, so it stays well under that.
        _require(1 <= self.row_group_mb <= 1024, "shard.row_group_mb must be in 1..1024")


@dataclass(frozen=True)
class PrepareConfig:
    output_path: str = ""
    # Who reads the inputs: auto (prepare's own tasks for line-mode Zhang CSV on a local
    # filesystem, else Spark's readers), python (own tasks, or a one-line error), spark.
    io: str = "auto"

    def __post_init__(self) -> None:
        _one_of("prepare", "io", self.io, ("auto", "python", "spark"))


@dataclass(frozen=True)
class ModelConfig:
    """Model choice and sizes; the number of classes comes from the prepared dataset."""

    name: str = "fasttext"
    embed_dim: int = 32
    char_cnn_size: str = "small"
    dropout: float = 0.5
    sparse_embeddings: bool = True
    # model.name: lstm (a recurrent model over the word unigrams in order)
    lstm_hidden: int = 64
    lstm_layers: int = 1
    lstm_bidirectional: bool = True

    def __post_init__(self) -> None:
        _one_of("model", "name", self.name, ("fasttext", "lstm", "char_cnn", "cnn"))
        _require(self.lstm_hidden > 0 and self.lstm_layers > 0, "model.lstm_hidden and model.lstm_layers must be > 0")
        _one_of("model", "char_cnn_size", self.char_cnn_size, ("small", "large"))
        _require(self.embed_dim > 0, "model.embed_dim must be > 0")
        _require(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop. ``batch_size`` is per rank; the learning rate is scaled by world size.

    ``optimizer: auto``, ``lr: 0``, ``batch_size: 0``, ``epochs: 0``, ``lr_schedule: auto``,
    ``momentum: -1``, ``warmup_epochs: -1``, ``early_stopping_patience: -1`` and
    ``label_smoothing: -1`` take the model's recipe (``train/recipes.py``;
    the batch shrinks on small data so an epoch has enough steps); set any of them to override
    just that part.
    """

    data_path: str = ""
    run_dir: str = ""
    launcher: str = "spark"
    num_proc: int = 0
    mode: str = "sync"
    epochs: int = 0
    batch_size: int = 0
    optimizer: str = "auto"
    lr: float = 0.0
    lr_schedule: str = "auto"
    momentum: float = -1.0
    weight_decay: float = 0.0
    scale_lr: bool = True
    warmup_epochs: float = -1.0
    seed: int = 42
    early_stopping_patience: int = -1
    label_smoothing: float = -1.0
    max_restarts: int = 0
    checkpoint_every_steps: int = 0
    steps_per_epoch: int = 0
    reader: str = "auto"
    reader_workers: int = 1
    shuffle_buffer: int = 16384
    cache_mb: int = 1024
    device: str = "auto"
    resume: bool = False
    log_every_steps: int = 50
    progress: bool = True
    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = "dl_pipeline"
    mlflow_registered_model: str = ""  # registers the logged model under this name (needs a tracking URI)
    # transfer learning: warm-start from a trained bundle (train/transfer.py)
    init_from: str = ""
    freeze: tuple[str, ...] = ()
    body_lr_factor: float = 1.0

    def __post_init__(self) -> None:
        _require(not self.freeze or bool(self.init_from), "train.freeze needs train.init_from (a pre-trained bundle to keep fixed)")
        _require(self.body_lr_factor > 0, "train.body_lr_factor must be > 0 (the pre-trained body's LR = factor x LR)")
        _one_of("train", "launcher", self.launcher, ("spark", "horovodrun", "torch_distributor", "local"))
        _one_of("train", "reader", self.reader, ("auto", "petastorm", "arrow"))
        _one_of("train", "mode", self.mode, ("sync", "hogwild"))
        _one_of("train", "optimizer", self.optimizer, ("auto", "sgd", "adam"))
        _one_of("train", "lr_schedule", self.lr_schedule, ("auto", "constant", "linear", "cosine"))
        _one_of("train", "device", self.device, ("auto", "cpu", "cuda"))
        _require(self.num_proc >= 0, "train.num_proc must be >= 0 (0 = every Spark task slot)")
        _require(self.max_restarts >= 0, "train.max_restarts must be >= 0 (relaunches from the last checkpoint after a rank dies)")
        _require(self.epochs >= 0, "train.epochs must be >= 0 (0 = the model's recipe, with early stopping)")
        _require(self.batch_size >= 0, "train.batch_size must be >= 0 (0 = the model's recipe)")
        _require(self.lr >= 0, "train.lr must be >= 0 (0 = the model's recipe)")
        _require(self.momentum >= 0 or self.momentum == -1, "train.momentum must be >= 0 (-1 = the model's recipe)")
        _require(self.warmup_epochs >= 0 or self.warmup_epochs == -1, "train.warmup_epochs must be >= 0 (-1 = the model's recipe)")
        _require(self.early_stopping_patience >= -1,
                 "train.early_stopping_patience must be >= 0 epochs (0 = never stop early, -1 = the model's recipe)")
        _require(0 <= self.label_smoothing < 1 or self.label_smoothing == -1,
                 "train.label_smoothing must be in [0, 1) (-1 = the model's recipe)")
        _require(self.steps_per_epoch >= 0, "train.steps_per_epoch must be >= 0 (0 = rows / world / batch)")
        _require(self.reader_workers >= 1, "train.reader_workers must be >= 1")
        _require(self.shuffle_buffer >= 0, "train.shuffle_buffer must be >= 0 (rows)")
        _require(self.cache_mb >= 0, "train.cache_mb must be >= 0 (MiB per reader; 0 = stream every pass from Parquet)")
        _require(self.log_every_steps >= 1, "train.log_every_steps must be >= 1")
        _require(self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0 (0 = at epoch ends only)")


@dataclass(frozen=True)
class HorovodConfig:
    start_timeout_s: int = 120
    hosts: str = ""
    nics: tuple[str, ...] = ()
    fp16_allreduce: bool = False
    verbose: int = 0

    def __post_init__(self) -> None:
        _require(self.start_timeout_s > 0, "horovod.start_timeout_s must be > 0")


@dataclass(frozen=True)
class HogwildConfig:
    """HOGWILD! (Niu et al. 2011): lock-free workers sharing one model inside each rank."""

    workers: int = 2
    sync_every: int = 50

    def __post_init__(self) -> None:
        _require(self.workers >= 1, "hogwild.workers must be >= 1")
        _require(self.sync_every >= 1, "hogwild.sync_every must be >= 1")


@dataclass(frozen=True)
class ScoreConfig:
    """Text models score Zhang CSV, CSV, JSON or Parquet rows. Image models score image files
    (``image_files``: PNG/JPEG under ``input_path``, ids from ``path``, ``length``,
    ``modificationTime``) or Parquet with the encoded image bytes in ``image_column``."""

    model_path: str = ""
    input_path: str = ""
    output_path: str = ""
    run_date: str = ""
    input_format: str = "zhang_csv"
    id_columns: tuple[str, ...] = ()
    batch_size: int = 1024
    max_records_per_batch: int = 4096
    top_k: int = 0
    output_format: str = "parquet"
    image_column: str = "image"
    max_image_bytes: int = 16 << 20  # larger encoded images are rejected (image_too_large), never read
    # A date's lock older than this is a lost run's (its machine gone) and is taken over; keep it
    # above the longest run (the bundle's job times out after 4 h). 0 = only a dead local process's.
    stale_lock_after_s: int = 6 * 3600
    # Who moves a text model's Zhang CSV lines in and its Parquet rows out. "python": the scoring
    # tasks read their own byte ranges of the files and write their own Parquet parts (Spark
    # schedules them); "spark": Spark's text reader and Parquet writer; "auto": "python" for
    # uncompressed local or mounted files (file://, /dbfs, /Volumes), else "spark".
    io: str = "auto"

    def __post_init__(self) -> None:
        _one_of("score", "input_format", self.input_format, ("zhang_csv", "csv", "json", "parquet", "image_files"))
        _one_of("score", "io", self.io, ("auto", "python", "spark"))
        _require(1 <= self.max_image_bytes < 1 << 31, "score.max_image_bytes must be in 1..2147483647 (Spark reads a file into one byte array)")
        _one_of("score", "output_format", self.output_format, ("parquet", "delta"))
        _require(self.batch_size >= 1, "score.batch_size must be >= 1")
        _require(self.max_records_per_batch >= 1, "score.max_records_per_batch must be >= 1")
        _require(self.top_k >= 0, "score.top_k must be >= 0")
        _require(self.stale_lock_after_s >= 0, "score.stale_lock_after_s must be >= 0 seconds (0 = never by age)")


@dataclass(frozen=True)
class SparkConfig:
    """Used only when no SparkSession exists yet (spark-submit and Databricks bring their own)."""

    master: str = "local[*]"
    app_name: str = "dl_pipeline"
    conf: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    horovod: HorovodConfig = field(default_factory=HorovodConfig)
    hogwild: HogwildConfig = field(default_factory=HogwildConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------------
# Loading, overriding, type checking
# --------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise UserError naming ``where``.

    Only safe widenings are done: int -> float, list -> tuple, scalar -> 1-tuple of str.
    """
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        # YAML turns 2024-01-31 into a date and 1e-3 into a float; keep str keys usable.
        if hasattr(value, "isoformat"):
            return value.isoformat()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            return tuple(str(v) for v in value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return {str(k): str(v) if not isinstance(v, bool) else str(v).lower() for k, v in value.items()}
    else:  # pragma: no cover - a new annotation nobody taught _coerce
        raise TypeError(f"unsupported config type {tp!r} at {where}")
    tname = getattr(tp, "__name__", str(tp))
    raise UserError(f"{where}: expected {tname}, got {value!r} ({type(value).__name__})")


def _section_names() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _apply(base: dict[str, dict[str, Any]], section: str, key: str, value: Any, origin: str) -> None:
    sections = _section_names()
    if section not in sections:
        raise UserError(f"{origin}: unknown section {section!r}; known sections: {', '.join(sections)}")
    types = _field_types(sections[section])
    if key not in types:
        # dict-typed fields take sub-keys: spark.conf.spark.sql.shuffle.partitions=4
        head, _, rest = key.partition(".")
        if rest and head in types and (types[head] is dict or typing.get_origin(types[head]) is dict):
            base[section].setdefault(head, {})
            base[section][head] = {**base[section][head], rest: _coerce(f"{section}.{key}", {rest: value}, dict)[rest]}
            return
        raise UserError(
            f"{origin}: unknown key {section}.{key}; known keys in [{section}]: {', '.join(sorted(types))}"
        )
    coerced = _coerce(f"{origin}: {section}.{key}", value, types[key])
    if isinstance(coerced, dict):
        coerced = {**base[section].get(key, {}), **coerced}
    base[section][key] = coerced


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found: pass an existing YAML file to --config (see conf/)")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config file {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UserError(f"config file {path}: top level must be a mapping of sections, got {type(doc).__name__}")
    return doc


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value`` into (section, key, YAML-parsed value)."""
    name, eq, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not eq or not dot or not section or not key:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. --set train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section, key, value


def load_config(path: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Build the resolved :class:`Config` from defaults, an optional YAML file and overrides."""
    layered: dict[str, dict[str, Any]] = {name: {} for name in _section_names()}
    if path:
        doc = _read_yaml(path)
        for section, body in doc.items():
            if not isinstance(body, dict):
                raise UserError(f"config file {path}: section {section!r} must be a mapping of key: value")
            for key, value in body.items():
                _apply(layered, str(section), str(key), value, f"config file {path}")
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(layered, section, key, value, "--set")
    return build_config(layered)


def build_config(layered: Mapping[str, Mapping[str, Any]]) -> Config:
    """Instantiate each section; their ``__post_init__`` checks raise UserError."""
    sections = _section_names()
    return Config(**{name: cls(**dict(layered.get(name, {}))) for name, cls in sections.items()})


def config_from_dict(doc: Mapping[str, Mapping[str, Any]]) -> Config:
    """Rebuild a Config saved with :meth:`Config.to_dict` (e.g. from a run directory)."""
    layered: dict[str, dict[str, Any]] = {name: {} for name in _section_names()}
    for section, body in doc.items():
        for key, value in body.items():
            _apply(layered, section, key, value, "saved config")
    return build_config(layered)


def replace(cfg: Config, **sections: Mapping[str, Any]) -> Config:
    """Return ``cfg`` with some keys changed, e.g. ``replace(cfg, train={"epochs": 1})``."""
    layered = {name: {} for name in _section_names()}
    for section, body in sections.items():
        for key, value in body.items():
            _apply(layered, section, key, value, "replace()")
    return dataclasses.replace(
        cfg, **{s: dataclasses.replace(getattr(cfg, s), **layered[s]) for s in sections}
    )
