"""Public API of the HF <-> Megatron-Core converters (``megatron_swift.converters.api``).

* ``load_hf_into_mcore(chunks, hf_dir, config, settings)``: fill this rank's built chunks from an
  HF safetensors directory (each rank reads only its slices).
* ``iter_hf_weights(chunks, config, settings, everywhere=...)``: the model as HF-named full tensors
  (streamed; on every rank with ``everywhere``, for colocated rollout engines).
* ``save_mcore_as_hf(chunks, config, settings, hf_config, out_dir, ...)``: write the model as an
  HF directory (collective; streams tensor by tensor).
* ``convert_hf_to_mcore`` / ``convert_mcore_to_hf``: the whole-checkpoint conversions of
  ``megatron export``; ``check_precision``: the ``--test_convert_precision`` comparison;
  ``load_checkpoint`` / ``save_checkpoint``: plain dist-checkpoint I/O of built chunks.

(``converters/`` has no ``__init__.py``, like ``kernels/``: it is reached only as
``megatron_swift.converters``; see setup.py.) See docs/conversion.md.
"""

from .convert import convert_hf_to_mcore, convert_mcore_to_hf
from .hf_dir import save_mcore_as_hf
from .load import load_hf_into_mcore
from .write_hf import iter_hf_weights, write_hf_weights
from .mcore_io import load_checkpoint, save_checkpoint
from .precision import check_precision
from .registry import MAPPINGS, mapping_for

__all__ = [
    "MAPPINGS", "check_precision", "convert_hf_to_mcore", "convert_mcore_to_hf", "load_checkpoint",
    "iter_hf_weights", "load_hf_into_mcore", "mapping_for", "save_checkpoint", "save_mcore_as_hf",
    "write_hf_weights",
]
