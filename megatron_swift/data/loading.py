"""Reading datasets: ``--dataset id_or_path[:subset][#N]`` -> a ``datasets`` dataset of raw rows.

A raw row is ``{"__row": <the row as a JSON string>, "__file": <file>, "__line": <line or row no.>}``;
parsing and validating the row happens later, in the (parallel, cached) preprocessing map, so a
malformed line is a row that can be dropped and counted (or, with ``--strict``, stop the run with
its file and line) instead of a file that fails to load.

Local data: ``.jsonl``, ``.json`` (a JSON array, or JSON lines), ``.csv``, ``.parquet``, ``.arrow``
files, and folders of them (recursively; ``folder:sub`` selects the sub-folder or files named
``sub``; ``:all`` everything). Hub ids: downloaded (or found in the cache) with ModelScope, or with
Hugging Face under ``--use_hf``; offline (``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` /
``MODELSCOPE_OFFLINE=1``) only the cache is consulted, and a dataset that is not there is a
:class:`DatasetNotFoundError` that says so.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

logger = logging.getLogger(__name__)

DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
_READER_VERSION = 1


class DatasetNotFoundError(FileNotFoundError):
    """A --dataset that is neither a local path nor reachable/cached on the hub."""


class DataRowError(ValueError):
    """A malformed row under --strict: names file, line and reason."""


@dataclass
class DatasetSpec:
    """One ``--dataset`` entry."""

    text: str  # as the user wrote it
    name: str  # id or path (without :subset and #N)
    subsets: List[str] = field(default_factory=list)  # [] = default
    sample: Optional[int] = None  # #N
    local_path: Optional[str] = None  # absolute path when local

    @property
    def is_local(self) -> bool:
        return self.local_path is not None


def parse_dataset_spec(text: str) -> DatasetSpec:
    """``id_or_path[:subset1/subset2][#N]`` (seed semantics; ``:all`` = every subset)."""
    raw = text.strip()
    sample = None
    m = re.search(r"#(\d+)$", raw)
    if m:
        sample = int(m.group(1))
        raw = raw[:m.start()]
    elif "#" in raw and not os.path.exists(raw):
        raise ValueError(f"--dataset {text!r}: the part after '#' must be a sample count (an integer)")
    if os.path.exists(raw):
        return DatasetSpec(text, raw, [], sample, os.path.abspath(raw))
    name, subsets = raw, []
    if ":" in raw:
        name, tail = raw.rsplit(":", 1)
        subsets = [s for s in tail.split("/") if s]
    if not name:
        raise ValueError(f"--dataset {text!r}: empty dataset id or path")
    local = os.path.abspath(name) if os.path.exists(name) else None
    if local is None and (name.startswith((".", "/", "~")) or name.endswith(DATA_EXTENSIONS)):
        raise DatasetNotFoundError(f"--dataset {text!r}: no such file or folder: {os.path.abspath(name)}")
    return DatasetSpec(text, name, subsets, sample, local)


def offline_mode() -> dict:
    truthy = {"1", "true", "yes", "on"}
    env = os.environ
    return {
        "hf": any(env.get(k, "").lower() in truthy for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")),
        "modelscope": env.get("MODELSCOPE_OFFLINE", "").lower() in truthy
        or env.get("HF_HUB_OFFLINE", "").lower() in truthy,
    }


def resolve_hub_dataset(spec: DatasetSpec, use_hf: bool = False, hub_token: Optional[str] = None) -> str:
    """Local folder of a hub dataset (from the hub's cache, downloading when online)."""
    offline = offline_mode()
    if use_hf:
        hub, var, is_offline = "Hugging Face", "HF_HUB_OFFLINE=1", offline["hf"]
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    else:
        hub, var, is_offline = "ModelScope", "MODELSCOPE_OFFLINE=1", offline["modelscope"]
        cache = os.environ.get("MODELSCOPE_CACHE") or "~/.cache/modelscope"
    try:
        if use_hf:
            from huggingface_hub import snapshot_download

            return snapshot_download(spec.name, repo_type="dataset", local_files_only=is_offline, token=hub_token)
        from modelscope.hub.snapshot_download import dataset_snapshot_download

        if is_offline:  # the cache only: the legacy (< 1.38) layout, then the current one
            from modelscope.hub.utils.utils import find_reusable_legacy_repo_dir
            from modelscope_hub.compat.snapshot_download import dataset_snapshot_download as ms_download

            legacy = find_reusable_legacy_repo_dir(spec.name, repo_type="dataset", cache_dir=None)
            if legacy and os.path.isdir(legacy) and os.listdir(legacy):
                return legacy
            return ms_download(spec.name, local_files_only=True, token=hub_token)
        return dataset_snapshot_download(spec.name, token=hub_token)
    except Exception as e:  # hub clients raise many types (offline, 404, connection)
        where = f"the {hub} cache ({cache})"
        if is_offline:
            why = f"it is not in {where}, and offline mode ({var}) forbids downloading it"
        else:
            why = f"it is not in {where} and downloading it failed ({type(e).__name__}: {str(e)[:200]})"
        other = "ModelScope (drop --use_hf)" if use_hf else "Hugging Face (--use_hf true)"
        raise DatasetNotFoundError(
            f"--dataset {spec.text!r}: not a local file or folder, and {why}. Pass a local path (jsonl/json/csv/"
            f"parquet file or folder), download the dataset into the cache first, or try {other}."
        ) from None


def _is_hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split(os.sep) if part not in (".", ".."))


def data_files(spec: DatasetSpec, root: str, from_hub: bool = False) -> List[str]:
    """The data files a spec names (sorted, so reading order is reproducible)."""
    if os.path.isfile(root):
        if not root.endswith(DATA_EXTENSIONS):
            raise ValueError(f"--dataset {spec.text!r}: unsupported file type (supported: "
                             f"{', '.join(DATA_EXTENSIONS)})")
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.endswith(DATA_EXTENSIONS) and not f.startswith("."):
                found.append(os.path.join(dirpath, f))
    subsets = [s for s in spec.subsets if s not in ("default",)]
    if subsets and "all" not in subsets:
        chosen = []
        for sub in subsets:
            hits = [p for p in found if os.path.relpath(p, root).split(os.sep)[0] == sub
                    or os.path.splitext(os.path.basename(p))[0] == sub]
            if not hits:
                raise ValueError(f"--dataset {spec.text!r}: subset {sub!r} not found under {root} "
                                 f"(subsets are sub-folders or file names)")
            chosen.extend(p for p in hits if p not in chosen)
        found = chosen
    if from_hub:  # a hub repo: its train split when it names splits
        train = [p for p in found if re.search(r"(^|[/_.-])train([/_.-]|$)", os.path.relpath(p, root))]
        found = train or found
    if not found:
        raise ValueError(f"--dataset {spec.text!r}: no data files ({', '.join(DATA_EXTENSIONS)}) under {root}")
    return found


# ------------------------------------------------------------------------------------------ readers
def _bad(reason: str) -> str:
    return json.dumps({"__bad_row__": reason})


def iter_file_rows(path: str) -> Iterator[tuple]:
    """Yields ``(row_json_text, line_or_row_number)`` for every row of a data file."""
    if path.endswith(".jsonl"):
        yield from _iter_jsonl(path)
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # JSON lines in a .json file
                yield from _iter_jsonl(path)
                return
            raise DataRowError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) == 1:
                data = lists[0]
            else:
                data = [data]
        if not isinstance(data, list):
            raise DataRowError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
        for i, row in enumerate(data, 1):
            yield json.dumps(row, ensure_ascii=False), i
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for row in reader:
                line = reader.line_num
                if None in row:
                    yield _bad(f"csv row has {len(header) + len(row[None])} fields, the header has {len(header)}"), line
                elif any(v is None for v in row.values()):
                    yield _bad(f"csv row has fewer fields than the header ({len(header)})"), line
                else:
                    yield json.dumps(row, ensure_ascii=False), line
    elif path.endswith((".parquet", ".arrow")):
        yield from _iter_arrow(path)
    else:
        raise ValueError(f"{path}: unsupported file type")


def _iter_jsonl(path: str):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if line:
                yield line, lineno


def _iter_arrow(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    else:
        try:
            reader = pa.ipc.open_stream(path)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(path)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
    n = 0
    for batch in batches:
        for row in batch.to_pylist():
            n += 1
            yield json.dumps(row, ensure_ascii=False, default=str), n


def _generate_raw_rows(files: List[str]):
    for path in files:
        for row, line in iter_file_rows(path):
            yield {"__row": row, "__file": path, "__line": line}


def raw_features():
    from datasets import Features, Value

    return Features({"__row": Value("string"), "__file": Value("string"), "__line": Value("int64")})


def _files_fingerprint(files: List[str], nonce: str = "") -> str:
    h = hashlib.sha256(f"raw-v{_READER_VERSION}{nonce}".encode())
    for p in files:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def read_raw(spec: DatasetSpec, *, streaming: bool = False, use_hf: bool = False, hub_token: Optional[str] = None,
             cache_dir: Optional[str] = None, load_from_cache_file: bool = True):
    """Raw rows of one ``--dataset`` entry as a ``datasets.Dataset`` (``IterableDataset`` when
    streaming)."""
    from datasets import Dataset, IterableDataset

    from_hub = not spec.is_local
    root = spec.local_path if spec.is_local else resolve_hub_dataset(spec, use_hf, hub_token)
    files = data_files(spec, root, from_hub=from_hub)
    if streaming:
        return IterableDataset.from_generator(_generate_raw_rows, features=raw_features(), gen_kwargs={"files": files})
    nonce = "" if load_from_cache_file else os.urandom(8).hex()
    try:
        return Dataset.from_generator(_generate_raw_rows, features=raw_features(), gen_kwargs={"files": files},
                                      cache_dir=cache_dir, fingerprint=_files_fingerprint(files, nonce))
    except Exception as e:  # datasets wraps generator errors in DatasetGenerationError
        cause = e
        while cause is not None and not isinstance(cause, (DataRowError, OSError, UnicodeDecodeError)):
            cause = cause.__cause__ or cause.__context__
        if cause is not None and cause is not e:
            raise cause from None
        raise
