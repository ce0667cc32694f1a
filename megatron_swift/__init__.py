"""megatron-swift: a Megatron-Core training stack for Hugging Face LLMs.

Sub-packages: ``platform`` (CUDA+NCCL or CPU+gloo), ``model`` (HF config -> Megatron-Core GPT),
``args`` and ``cli`` (the ``megatron`` command), ``trainer``; ``megatron_swift.converters`` and
``megatron_swift.kernels`` live in the top-level folders ``converters/`` and ``kernels/``.
"""

import os as _os

__version__ = "0.1.0"

# converters/ and kernels/ sit at the repo top (the design card's layout) and have no __init__.py,
# so that `import kernels` never finds them instead of Hugging Face's `kernels` package (which
# transformers probes for). A wheel maps them into this package (setup.py); in a source checkout
# or editable install they are reached through this package's search path.
_REPO_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_REPO_ROOT, "setup.py")) and _os.path.isdir(_os.path.join(_REPO_ROOT, "kernels")):
    __path__.append(_REPO_ROOT)  # noqa: F821 (package __path__)
