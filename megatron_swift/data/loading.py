"""Reading datasets: ``--dataset id_or_path[:subset][#N]`` -> a ``datasets`` dataset of raw rows.

A raw row is ``{"__row": <the row as a JSON string>, "__file": <file>, "__line": <line or row no.>}``;
parsing and validating the row happens later, in the (parallel, cached) preprocessing map, so a
malformed line (bad JSON, bytes that are not UTF-8) is a row that can be dropped and counted (or,
with ``--strict``, stop the run with its file and line) instead of a file that fails to load. A
dataset with no rows at all is an error naming its file(s).

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
# names ending like a file (not a hub id) that are not data files we read: "no such file" when missing
_OTHER_FILE_EXTENSIONS = (".txt", ".tsv", ".xlsx", ".xls", ".gz", ".zip", ".tar", ".bz2", ".xz", ".zst", ".yaml",
                          ".yml", ".md", ".pkl", ".pt", ".npy")
_READER_VERSION = 2  # 2: undecodable lines are bad rows ("not UTF-8")


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
    flag: str = "--dataset"  # the argument it came from (for messages)

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    @property
    def where(self) -> str:
        return f"{self.flag} {self.text!r}"


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a hub id (``org/name``): it is meant as a local file or folder."""
    return (name.startswith((".", "/", "~")) or name.endswith(DATA_EXTENSIONS + _OTHER_FILE_EXTENSIONS)
            or name.count("/") >= 2)


def parse_dataset_spec(text: str, flag: str = "--dataset") -> DatasetSpec:
    """``id_or_path[:subset1/subset2][#N]`` (seed semantics; ``:all`` = every subset). ``flag`` is the
    argument the text came from (``--dataset`` / ``--val_dataset``); messages name it."""
    raw = text.strip()
    where = f"{flag} {text!r}"
    sample = None
    if "#" in raw and not os.path.exists(os.path.expanduser(raw)):
        raw, _, tail = raw.rpartition("#")
        if not re.fullmatch(r"[0-9]+", tail.strip()):
            raise ValueError(f"{where}: the part after '#' must be the number of rows to sample (a non-negative "
                             f"integer), got {tail!r}")
        sample = int(tail)
    if os.path.exists(os.path.expanduser(raw)):
        return DatasetSpec(text, raw, [], sample, os.path.abspath(os.path.expanduser(raw)), flag)
    name, subsets = raw, []
    if ":" in raw:
        name, tail = raw.rsplit(":", 1)
        subsets = [s for s in tail.split("/") if s]
    if not name:
        raise ValueError(f"{where}: empty dataset id or path")
    path = os.path.expanduser(name)
    local = os.path.abspath(path) if os.path.exists(path) else None
    if local is None and _looks_like_path(name):
        raise DatasetNotFoundError(f"{where}: no such file or folder: {os.path.abspath(path)}")
    return DatasetSpec(text, name, subsets, sample, local, flag)


def offline_mode() -> dict:
    truthy = {"1", "true", "yes", "on"}
    env = os.environ
    return {
        "hf": any(env.get(k, "").lower() in truthy for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")),
        "modelscope": env.get("MODELSCOPE_OFFLINE", "").lower() in truthy
        or env.get("HF_HUB_OFFLINE", "").lower() in truthy,
    }


def resolve_hub_dataset(spec: DatasetSpec, use_hf: bool = False, hub_token: Optional[str] = None,
                        force_download: bool = False) -> str:
    """Local folder of a hub dataset (from the hub's cache, downloading when online; with
    ``force_download`` (``--download_mode force_redownload``) fetched again even when cached)."""
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

            return snapshot_download(spec.name, repo_type="dataset", local_files_only=is_offline, token=hub_token,
                                     force_download=force_download and not is_offline)
        from modelscope.hub.snapshot_download import dataset_snapshot_download

        if is_offline:  # the cache only: the legacy (< 1.38) layout, then the current one
            from modelscope.hub.utils.utils import find_reusable_legacy_repo_dir
            from modelscope_hub.compat.snapshot_download import dataset_snapshot_download as ms_download

            legacy = find_reusable_legacy_repo_dir(spec.name, repo_type="dataset", cache_dir=None)
            if legacy and os.path.isdir(legacy) and os.listdir(legacy):
                return legacy
            return ms_download(spec.name, local_files_only=True, token=hub_token)
        if force_download:  # modelscope has no force flag: a fresh cache directory of its own
            import tempfile

            return dataset_snapshot_download(spec.name, token=hub_token, cache_dir=tempfile.mkdtemp(
                prefix="megatron-swift-redownload-", dir=os.environ.get("MODELSCOPE_CACHE")))
        return dataset_snapshot_download(spec.name, token=hub_token)
    except Exception as e:  # hub clients raise many types (offline, 404, connection)
        where = f"the {hub} cache ({cache})"
        if is_offline:
            why = f"it is not in {where}, and offline mode ({var}) forbids downloading it"
        else:
            why = f"it is not in {where} and downloading it failed ({type(e).__name__}: {str(e)[:200]})"
        other = "ModelScope (drop --use_hf)" if use_hf else "Hugging Face (--use_hf true)"
        raise DatasetNotFoundError(
            f"{spec.where}: not a local file or folder, and {why}. Pass a local path (jsonl/json/csv/"
            f"parquet file or folder), download the dataset into the cache first, or try {other}."
        ) from None


def _is_hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split(os.sep) if part not in (".", ".."))


def data_files(spec: DatasetSpec, root: str, from_hub: bool = False) -> List[str]:
    """The data files a spec names (sorted, so reading order is reproducible)."""
    if os.path.isfile(root):
        if not root.endswith(DATA_EXTENSIONS):
            ext = os.path.splitext(root)[1] or "(none)"
            raise ValueError(f"{spec.where}: unsupported file type {ext} of {root} (supported: "
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
                raise ValueError(f"{spec.where}: subset {sub!r} not found under {root} "
                                 f"(subsets are sub-folders or file names)")
            chosen.extend(p for p in hits if p not in chosen)
        found = chosen
    if from_hub:  # a hub repo: its train split when it names splits
        train = [p for p in found if re.search(r"(^|[/_.-])train([/_.-]|$)", os.path.relpath(p, root))]
        found = train or found
    if not found:
        raise ValueError(f"{spec.where}: no data files ({', '.join(DATA_EXTENSIONS)}) under {root}")
    return found


# ------------------------------------------------------------------------------------------ readers
NOT_UTF8 = "not UTF-8"  # the drop kind of a row whose bytes do not decode
_SURROGATE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of undecodable bytes


def _bad(reason: str, kind: str = "malformed row") -> str:
    """A raw row that preprocessing drops (or, with --strict, stops at) as ``kind: reason``."""
    return json.dumps({"__bad_row__": reason, "__bad_kind__": kind})


def _checked(row_text: str) -> str:
    if _SURROGATE.search(row_text):
        return _bad("the row holds bytes that cannot be decoded (data files must be UTF-8)", NOT_UTF8)
    return row_text


def iter_file_rows(path: str) -> Iterator[tuple]:
    """Yields ``(row_json_text, line_or_row_number)`` for every row of a data file. A line or row
    that cannot be read (bytes that are not UTF-8, a CSV row with the wrong field count) is yielded
    as a bad row (see ``_bad``), so it is dropped and counted like any malformed row."""
    if path.endswith(".jsonl"):
        yield from _iter_jsonl(path)
    elif path.endswith(".json"):
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig", errors="surrogateescape")  # rows with bad bytes: dropped below
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
            yield _checked(json.dumps(row, ensure_ascii=False)), i
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for row in reader:
                line = reader.line_num
                if None in row:
                    yield _bad(f"csv row has {len(header) + len(row[None])} fields, the header has {len(header)}"), line
                elif any(v is None for v in row.values()):
                    yield _bad(f"csv row has fewer fields than the header ({len(header)})"), line
                else:
                    yield _checked(json.dumps(row, ensure_ascii=False)), line
    elif path.endswith((".parquet", ".arrow")):
        yield from _iter_arrow(path)
    else:
        raise ValueError(f"{path}: unsupported file type")


def _iter_jsonl(path: str):
    with open(path, "rb") as f:
        for lineno, data in enumerate(f, 1):
            try:
                line = data.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield _bad(f"byte 0x{data[e.start]:02x} at position {e.start + 1} of the line cannot be decoded "
                           "(data files must be UTF-8)", NOT_UTF8), lineno
                continue
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
             force_download: bool = False,
             cache_dir: Optional[str] = None, load_from_cache_file: bool = True):
    """Raw rows of one ``--dataset`` entry as a ``datasets.Dataset`` (``IterableDataset`` when
    streaming)."""
    from datasets import Dataset, IterableDataset

    from_hub = not spec.is_local
    root = spec.local_path if spec.is_local else resolve_hub_dataset(spec, use_hf, hub_token, force_download)
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
        if not any(True for p in files for _ in iter_file_rows(p)):  # datasets: 'Instruction "train" ...'
            raise ValueError(no_rows_message(spec, files)) from None
        raise


def file_is_empty(path: str) -> bool:
    """Nothing, or only whitespace, in the file."""
    size = os.path.getsize(path)
    if size == 0:
        return True
    if size > (1 << 16) or path.endswith((".parquet", ".arrow")):
        return False
    with open(path, "rb") as f:
        return not f.read().strip()


def no_rows_message(spec: DatasetSpec, files: List[str]) -> str:
    """Why a dataset with these files yields no rows at all."""
    if len(files) == 1:
        return f"{spec.where}: dataset file {files[0]} {'is empty' if file_is_empty(files[0]) else 'holds no rows'}"
    shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
    return f"{spec.where}: none of its {len(files)} data files holds a row ({shown})"
