"""megatron-swift: a Megatron-Core training stack for Hugging Face LLMs.

Sub-packages: ``platform`` (CUDA+NCCL or CPU+gloo), ``model`` (HF config -> Megatron-Core GPT),
``args`` and ``cli`` (the ``megatron`` command), ``trainer``; ``megatron_swift.converters`` and
``megatron_swift.kernels`` live in the top-level folders ``converters/`` and ``kernels/``.
"""

__version__ = "0.1.0"
