"""Dataset-level steps, all on ``datasets`` (cached maps, multiprocess with ``--dataset_num_proc``):

  read raw rows -> normalize (drop/count bad rows; --strict raises) -> ``#N`` sampling ->
  train/val split -> concatenate or interleave -> shuffle -> encode with the template
  (drop/count rows the template rejects or that are too long with truncation_strategy delete)

A ``--dataset``/``--val_dataset`` entry with no rows left after preprocessing (every row dropped,
or ``#0``) is a ValueError naming it, with its drop summary. A row with media columns stops
preprocessing at its file:line (multimodal training is not supported).

``#N`` follows the seed: N below the dataset size samples without replacement; above it, the
whole dataset repeats ``N // size`` times plus a random ``N % size`` rows; sequential (first rows)
for streaming or ``--dataset_shuffle false``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from .loading import DataRowError, DatasetSpec, parse_dataset_spec, read_raw
from .preprocess import RowError, UnsupportedRowError, normalize_row, normalized_features

logger = logging.getLogger(__name__)

_PIPELINE_VERSION = 4  # 2: media rows stop preprocessing; bad-row kinds from the reader; 3: margin column; 4: extra


@dataclass
class DropStats:
    """Rows read / kept / dropped (by reason) for one step of one dataset."""

    name: str
    step: str  # "preprocess" or "encode"
    total: int = 0
    kept: int = 0
    kinds: Counter = field(default_factory=Counter)
    examples: List[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.total - self.kept

    def summary(self) -> str:
        if not self.dropped:
            return f"{self.name}: {self.step}: kept all {self.total} rows"
        kinds = ", ".join(f"{n} x {k}" for k, n in self.kinds.most_common())
        first = "; ".join(self.examples[:3])
        return f"{self.name}: {self.step}: dropped {self.dropped} of {self.total} rows ({kinds}); first: {first}"


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256(f"megatron-swift-data-v{_PIPELINE_VERSION}".encode())
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _is_iterable(ds) -> bool:
    from datasets import IterableDataset

    return isinstance(ds, IterableDataset)


# ---------------------------------------------------------------------------------------- normalize
def _normalize_batch(batch: Dict[str, list], *, columns, model_name, model_author, require_response: bool,
                     strict: bool) -> Dict[str, list]:
    out = {k: [] for k in ("messages", "tools", "rejected_response", "label", "margin", "extra", "__file", "__line",
                           "__error", "__error_kind")}
    for raw, path, line in zip(batch["__row"], batch["__file"], batch["__line"]):
        try:
            row = normalize_row(raw, columns=columns, model_name=model_name, model_author=model_author,
                                require_response=require_response)
            err = kind = None
        except UnsupportedRowError as e:  # a configuration mistake, not a bad row: stop at the first one
            raise DataRowError(f"{path}:{line}: {e}") from None
        except RowError as e:
            if strict:
                raise DataRowError(f"{path}:{line}: {e} (--strict true stops at the first bad row)") from None
            row = {"messages": [], "tools": None, "rejected_response": None, "label": None, "margin": None,
                   "extra": None}
            err, kind = f"{os.path.basename(path)}:{line}: {e}", e.kind
        for k in ("messages", "tools", "rejected_response", "label", "margin", "extra"):
            out[k].append(row[k])
        out["__file"].append(path)
        out["__line"].append(line)
        out["__error"].append(err)
        out["__error_kind"].append(kind)
    return out


def _drop_errors(ds, stats: DropStats, remove: List[str]):
    """Counts/logs rows whose ``__error`` is set and returns the dataset without them."""
    import pyarrow.compute as pc

    if "__error_kind" not in ds.column_names:  # a map over zero rows adds no columns
        stats.total = stats.kept = len(ds)
        return ds.remove_columns([c for c in remove if c in ds.column_names])
    kinds = ds.data.column("__error_kind")
    bad = np.asarray(pc.is_valid(kinds).to_numpy(zero_copy_only=False), dtype=bool)
    stats.total = len(ds)
    stats.kept = int((~bad).sum())
    if bad.any():
        idx = np.flatnonzero(bad)
        kind_list = kinds.take(idx).to_pylist()
        stats.kinds.update(kind_list)
        stats.examples.extend(ds.data.column("__error").take(idx[:5]).to_pylist())
        ds = ds.select(np.flatnonzero(~bad))
        logger.warning("%s", stats.summary())
    else:
        logger.info("%s", stats.summary())
    return ds.remove_columns([c for c in remove if c in ds.column_names])


def _drop_and_record(ds, name: str, step: str, stats):
    """Drops the rows a map step marked as errors and records the counts (map-style datasets)."""
    st = DropStats(name, step)
    ds = _drop_errors(ds, st, ["__error", "__error_kind"])
    if stats is not None:
        stats.append(st)
    return ds


def _streaming_drop(ds, name: str, step: str):
    seen = {"n": 0}

    def keep(kind, err):
        if kind is None:
            return True
        seen["n"] += 1
        if seen["n"] <= 20:
            logger.warning("%s: %s: dropped a row: %s", name, step, err)
        return False

    return ds.filter(keep, input_columns=["__error_kind", "__error"])


def normalize_dataset(raw, name: str, *, columns=None, model_name=None, model_author=None,
                      require_response: bool = True, strict: bool = False, num_proc: int = 1,
                      load_from_cache_file: bool = True, stats: Optional[List[DropStats]] = None):
    fn_kwargs = dict(columns=columns, model_name=model_name, model_author=model_author,
                     require_response=require_response, strict=strict)
    kw = dict(batched=True, batch_size=1000, fn_kwargs=fn_kwargs, remove_columns=["__row"],
              features=normalized_features())
    if _is_iterable(raw):
        ds = raw.map(_normalize_batch, **kw)
        return _streaming_drop(ds, name, "preprocess")
    fp = _fingerprint("normalize", raw._fingerprint, fn_kwargs)
    ds = raw.map(_normalize_batch, num_proc=num_proc if num_proc > 1 else None, new_fingerprint=fp,
                 load_from_cache_file=load_from_cache_file, desc=f"preprocess {name}", **kw)
    return _drop_and_record(ds, name, "preprocess", stats)


# ---------------------------------------------------------------------------------------- sample / split
def sample_indices(size: int, n: int, shuffle: bool, rng: np.random.RandomState) -> np.ndarray:
    """``#N`` indices: whole repeats of the dataset plus a remainder (random without replacement
    when ``shuffle``, else the first rows)."""
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    repeats, remain = divmod(n, size)
    idx = [np.tile(np.arange(size), repeats)]
    if remain:
        idx.append(rng.permutation(size)[:remain] if shuffle else np.arange(remain))
    return np.concatenate(idx).astype(np.int64)


def sample_dataset(ds, n: Optional[int], shuffle: bool, rng: np.random.RandomState):
    if n is None:
        return ds
    if _is_iterable(ds):
        return ds.take(n)
    if n > len(ds) and len(ds):
        logger.info("sampling %d rows from a dataset of %d: %d full repeats + %d sampled", n, len(ds),
                    n // len(ds), n % len(ds))
    return ds.select(sample_indices(len(ds), n, shuffle, rng))


def split_dataset(ds, ratio: float, rng: np.random.RandomState, shuffle: bool = True):
    """(train, val) with ``max(1, int(len * ratio))`` validation rows; (ds, None) when ratio is 0."""
    if ratio <= 0 or ds is None:
        return ds, None
    if _is_iterable(ds):
        logger.info("--split_dataset_ratio is ignored for streamed datasets (their length is unknown); "
                    "use --val_dataset")
        return ds, None
    if len(ds) < 2:
        logger.warning("dataset of %d row(s): no validation split", len(ds))
        return ds, None
    n_val = max(1, int(len(ds) * ratio))
    if shuffle:
        order = rng.permutation(len(ds))
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    else:  # the last rows
        train_idx, val_idx = np.arange(len(ds) - n_val), np.arange(len(ds) - n_val, len(ds))
    return ds.select(train_idx), ds.select(val_idx)


# ---------------------------------------------------------------------------------------- load
@dataclass
class DataOptions:
    """The DataArguments fields the loader reads (built from parsed args by ``from_args``)."""

    dataset: List[str] = field(default_factory=list)
    val_dataset: List[str] = field(default_factory=list)
    split_dataset_ratio: float = 0.0
    data_seed: int = 42
    dataset_num_proc: int = 1
    load_from_cache_file: bool = True
    dataset_shuffle: bool = True
    val_dataset_shuffle: bool = False
    streaming: bool = False
    interleave_prob: Optional[List[float]] = None
    stopping_strategy: str = "first_exhausted"
    shuffle_buffer_size: int = 1000
    columns: Optional[Dict[str, str]] = None
    strict: bool = False
    model_name: Optional[List[str]] = None
    model_author: Optional[List[str]] = None
    use_hf: bool = False
    hub_token: Optional[str] = None
    download_mode: str = "reuse_dataset_if_exists"

    @classmethod
    def from_args(cls, args, **overrides) -> "DataOptions":
        kwargs = {f: getattr(args, f) for f in cls.__dataclass_fields__ if hasattr(args, f)}
        kwargs.update(overrides)
        return cls(**kwargs)


@dataclass
class LoadedData:
    train: Any
    val: Any
    stats: List[DropStats]


def _combine(parts: list, opts: DataOptions):
    from datasets import concatenate_datasets, interleave_datasets

    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    if opts.interleave_prob is not None:
        return interleave_datasets(parts, probabilities=opts.interleave_prob, seed=opts.data_seed,
                                   stopping_strategy=opts.stopping_strategy)
    return concatenate_datasets(parts)


def load_datasets(opts: DataOptions, *, require_response: bool = True, cache_dir: Optional[str] = None) -> LoadedData:
    """Training and validation rows (normalized, sampled, split, combined, shuffled)."""
    rng = np.random.RandomState(opts.data_seed)
    stats: List[DropStats] = []
    sample_shuffle = opts.dataset_shuffle and not opts.streaming

    def load_one(text: str, flag: str = "--dataset"):
        what = "training" if flag == "--dataset" else "validation"
        spec: DatasetSpec = parse_dataset_spec(text, flag)
        raw = read_raw(spec, streaming=opts.streaming, use_hf=opts.use_hf, hub_token=opts.hub_token,
                       force_download=opts.download_mode == "force_redownload",
                       cache_dir=cache_dir, load_from_cache_file=opts.load_from_cache_file)
        ds = normalize_dataset(raw, spec.text, columns=opts.columns, model_name=opts.model_name,
                               model_author=opts.model_author, require_response=require_response,
                               strict=opts.strict, num_proc=opts.dataset_num_proc,
                               load_from_cache_file=opts.load_from_cache_file, stats=stats)
        if not _is_iterable(ds) and len(ds) == 0:
            raise ValueError(f"no {what} samples left: {stats[-1].summary()}")
        ds = sample_dataset(ds, spec.sample, sample_shuffle, rng)
        if not _is_iterable(ds) and len(ds) == 0:
            raise ValueError(f"no {what} samples left: {flag} {text!r}: #{spec.sample} selects no rows")
        return ds

    trains, vals = [], []
    ratio = 0.0 if opts.val_dataset else opts.split_dataset_ratio
    for text in opts.dataset:
        train, val = split_dataset(load_one(text), ratio, rng, shuffle=opts.dataset_shuffle)
        trains.append(train)
        vals.append(val)
    for text in opts.val_dataset:
        vals.append(load_one(text, "--val_dataset"))
    train, val = _combine(trains, opts), _combine(vals, dataclass_replace(opts, interleave_prob=None))
    if train is not None and opts.dataset_shuffle:
        train = (train.shuffle(seed=opts.data_seed, buffer_size=opts.shuffle_buffer_size) if _is_iterable(train)
                 else train.shuffle(seed=opts.data_seed))
    if val is not None and opts.val_dataset_shuffle:
        val = (val.shuffle(seed=opts.data_seed, buffer_size=opts.shuffle_buffer_size) if _is_iterable(val)
               else val.shuffle(seed=opts.data_seed))
    return LoadedData(train, val, stats)


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


# ---------------------------------------------------------------------------------------- encode
ENCODE_MODES = ("sft", "pt", "pair", "kto", "prompt")


def encoded_features(mode: str):
    from datasets import Features, List as DList, Value

    ids = DList(Value("int32"))
    cols = {"input_ids": ids, "labels": ids}
    if mode == "pair":
        cols = {"chosen_input_ids": ids, "chosen_labels": ids, "rejected_input_ids": ids, "rejected_labels": ids,
                "margin": Value("float64")}
    elif mode == "kto":
        cols["label"] = Value("bool")
    elif mode == "prompt":
        cols = {"input_ids": ids, "messages": DList({"role": Value("string"), "content": Value("string")}),
                "extra": Value("string")}
    cols.update({"length": Value("int32"), "__error": Value("string"), "__error_kind": Value("string")})
    return Features(cols)


def _encode_batch(batch: Dict[str, list], *, template, mode: str, strict: bool) -> Dict[str, list]:
    from megatron_swift.template import MaxLengthError

    n = len(batch["messages"])
    rows = [{"messages": batch["messages"][i], "tools": batch["tools"][i],
             "rejected_response": batch["rejected_response"][i], "label": batch["label"][i],
             "margin": batch["margin"][i] if "margin" in batch else None} for i in range(n)]
    results = template.encode_many(rows, mode)
    keys = list(encoded_features(mode))
    out = {k: [] for k in keys}
    for i, res in enumerate(results):
        if isinstance(res, Exception):
            where = f"{os.path.basename(batch['__file'][i])}:{batch['__line'][i]}"
            too_long = isinstance(res, MaxLengthError)
            if strict and not too_long:
                raise DataRowError(f"{batch['__file'][i]}:{batch['__line'][i]}: {res} "
                                   "(--strict true stops at the first bad row)")
            res = {"__error": f"{where}: {res}", "__error_kind": "too long" if too_long else "template error"}
        else:
            if mode == "pair":
                res["length"] = max(len(res["chosen_input_ids"]), len(res["rejected_input_ids"]))
            else:
                res["length"] = len(res["input_ids"])
            if mode == "prompt":
                res["messages"] = rows[i]["messages"]
                res["extra"] = batch["extra"][i] if "extra" in batch else None
            res["__error"] = res["__error_kind"] = None
        for k in keys:
            default = None if k in ("__error", "__error_kind", "label", "margin") else 0 if k == "length" else []
            out[k].append(res.get(k, default))
    return out


def encode_dataset(ds, template, *, mode: str = "sft", strict: bool = False, num_proc: int = 1,
                   load_from_cache_file: bool = True, name: str = "train",
                   stats: Optional[List[DropStats]] = None):
    """Normalized rows -> ``input_ids``/``labels``/``length`` (see ``encoded_features`` per mode)."""
    if ds is None:
        return None
    if mode not in ENCODE_MODES:
        raise ValueError(f"unknown encode mode {mode!r}; expected one of {ENCODE_MODES}")
    kw = dict(batched=True, batch_size=500, fn_kwargs=dict(template=template, mode=mode, strict=strict),
              remove_columns=[c for c in ds.column_names], features=encoded_features(mode))
    if _is_iterable(ds):
        out = ds.map(_encode_batch, **kw)
        return _streaming_drop(out, name, "encode").remove_columns(["__error", "__error_kind"])
    if num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fp = _fingerprint("encode", ds._fingerprint, template.fingerprint(), mode, strict)
    out = ds.map(_encode_batch, num_proc=num_proc if num_proc > 1 else None, new_fingerprint=fp,
                 load_from_cache_file=load_from_cache_file, desc=f"encode {name}", **kw)
    return _drop_and_record(out, name, "encode", stats)
