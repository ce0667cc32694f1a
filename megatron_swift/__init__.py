"""megatron-swift: a Megatron-Core training stack for Hugging Face LLMs.

Sub-packages: ``platform`` (CUDA+NCCL or CPU+gloo), ``model`` (HF config -> Megatron-Core GPT),
``args`` and ``cli`` (the ``megatron`` command), ``trainer``; ``megatron_swift.converters`` and
``megatron_swift.kernels`` live in the top-level folders ``converters/`` and ``kernels/``.
"""

import os as _os
import sys as _sys
from importlib.machinery import ModuleSpec as _ModuleSpec

__version__ = "0.1.0"

# converters/ and kernels/ sit at the repo top (the design card's layout) and have no __init__.py,
# so that `import kernels` never finds them instead of Hugging Face's `kernels` package (which
# transformers probes for). A wheel maps them into this package (setup.py). In a source checkout or
# an editable install this finder maps exactly those two names to their folders (namespace
# packages); nothing else at the repo top (tests/, scripts/) becomes part of the package.
_REPO_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_MAPPED_FOLDERS = {f"{__name__}.{name}": _os.path.join(_REPO_ROOT, name) for name in ("converters", "kernels")}


class _MappedFolderFinder:
    """``megatron_swift.converters`` / ``megatron_swift.kernels`` -> the repo's top-level folders."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        folder = _MAPPED_FOLDERS.get(name)
        if folder is None or not _os.path.isdir(folder):
            return None
        spec = _ModuleSpec(name, None, is_package=True)  # no loader: a namespace package
        spec.submodule_search_locations = [folder]
        return spec


_in_checkout = _os.path.isfile(_os.path.join(_REPO_ROOT, "setup.py")) and not _os.path.isfile(
    _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "kernels", "norm.py"))
if _in_checkout and not any(isinstance(f, type) and f.__name__ == "_MappedFolderFinder" for f in _sys.meta_path):
    _sys.meta_path.append(_MappedFolderFinder)
