"""``--dataset`` / ``--val_dataset`` checks that run before any worker starts (stdlib only).

The CLI validates arguments before it imports torch or datasets and before it launches workers, so
a dataset argument that can only fail (a local path that does not exist, an empty file, a bad
``#N``, an unsupported file type) is reported there, as an :class:`ArgumentError` naming the
argument and the value, instead of on every rank after the model is built. Hub ids (``org/name``)
are not checked here (that needs the network or the hub cache); rows are checked when the data is
loaded.
"""

from __future__ import annotations

from megatron_swift.args.errors import ArgumentError

from .loading import DatasetNotFoundError, data_files, file_is_empty, no_rows_message, parse_dataset_spec

DATASET_ARGUMENTS = ("dataset", "val_dataset")


def check_dataset_args(args) -> None:
    """Raises :class:`ArgumentError` for the first bad ``--dataset`` / ``--val_dataset`` entry."""
    for name in DATASET_ARGUMENTS:
        for text in getattr(args, name, None) or []:
            try:
                _check_one(text, f"--{name}")
            except (ValueError, DatasetNotFoundError) as e:  # messages start with "--<name> '<text>': "
                raise ArgumentError(f"argument {e}") from None
            except OSError as e:  # unreadable file or folder
                raise ArgumentError(f"argument --{name} {text!r}: cannot read it ({e})") from None


def _check_one(text: str, flag: str) -> None:
    spec = parse_dataset_spec(text, flag)  # '#N' syntax; a path-like name that does not exist
    if spec.sample == 0:
        raise ValueError(f"{spec.where}: #0 selects no rows (give a positive row count, or drop the '#0')")
    if not spec.is_local:
        return
    files = data_files(spec, spec.local_path)  # file type; folders with no data files; subsets
    if all(file_is_empty(f) for f in files):
        raise ValueError(no_rows_message(spec, files))
