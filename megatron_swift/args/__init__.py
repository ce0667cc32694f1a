"""Typed arguments of the ``megatron`` command (stdlib + yaml only; no torch/megatron imports).

Use :func:`parse_args` (``parse_args("sft", ["--model", "Qwen/Qwen2.5-0.5B", ...])``); it returns the
command's dataclass with every default resolved and the derived fields ``command``, ``world_size``,
``data_parallel_size``, ``num_micro_batches``, ``hf_config``, ``model_dir`` and ``explicit_args``
filled. Problems raise :class:`ArgumentError` (a ``ValueError``) naming the argument.
"""
from megatron_swift.args.commands import (ALIASES, COMMANDS, SECTIONS, TRAINING_COMMANDS, ExportCommandArguments,
                                          PtArguments, RLHFCommandArguments, SftArguments, field_infos)
from megatron_swift.args.dist_env import is_torchrun_worker, relaunch_requested, world_size_from_env
from megatron_swift.args.errors import ArgumentError
from megatron_swift.args.help import format_command_help, format_main_help
from megatron_swift.args.parser import collect_values, load_config_file, parse_args
from megatron_swift.args.sections import (BaseArguments, DataArguments, DerivedArguments, ExportArguments,
                                          MegatronArguments, ModelArguments, ParallelArguments, RLHFArguments,
                                          TemplateArguments, TunerArguments)

__all__ = [
    "ArgumentError", "parse_args", "collect_values", "load_config_file",
    "BaseArguments", "ModelArguments", "DataArguments", "TemplateArguments", "ParallelArguments",
    "MegatronArguments", "TunerArguments", "RLHFArguments", "ExportArguments", "DerivedArguments",
    "SftArguments", "PtArguments", "RLHFCommandArguments", "ExportCommandArguments",
    "COMMANDS", "SECTIONS", "ALIASES", "TRAINING_COMMANDS", "field_infos",
    "format_command_help", "format_main_help",
    "is_torchrun_worker", "relaunch_requested", "world_size_from_env",
]
