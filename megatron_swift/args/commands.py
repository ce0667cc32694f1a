"""Per-command argument classes: which sections each command has, its defaults and aliases."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Dict, Optional

from megatron_swift.args._fields import TypeInfo, override, type_info
from megatron_swift.args.sections import (BaseArguments, DataArguments, DerivedArguments, ExportArguments,
                                          MegatronArguments, ModelArguments, ParallelArguments, RLHFArguments,
                                          RolloutServerArguments, TemplateArguments, TunerArguments)


class _ArgsMixin:
    """Helpers shared by every command's arguments object."""

    def to_dict(self, include_derived: bool = True) -> dict:
        """Plain dict of all fields (JSON-serializable), e.g. for ``args.json``."""
        out = {}
        for f in dataclasses.fields(self):
            if not include_derived and f.metadata.get("derived"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def is_training(self) -> bool:
        return self.command in TRAINING_COMMANDS


@dataclass
class SftArguments(_ArgsMixin, DerivedArguments, BaseArguments, ModelArguments, DataArguments, TemplateArguments,
                   MegatronArguments, TunerArguments):
    """``megatron sft``: supervised fine-tuning."""


@dataclass
class PtArguments(SftArguments):
    """``megatron pt``: continued pre-training (generation template, loss on all tokens)."""
    use_chat_template: bool = override(SftArguments, "use_chat_template", False)
    loss_scale: str = override(SftArguments, "loss_scale", "all")


@dataclass
class RLHFCommandArguments(SftArguments, RLHFArguments):
    """``megatron rlhf``: preference / RL training."""
    loss_scale: str = override(SftArguments, "loss_scale", "last_round")
    calculate_per_token_loss: bool = override(SftArguments, "calculate_per_token_loss", False)


@dataclass
class ExportCommandArguments(_ArgsMixin, DerivedArguments, BaseArguments, ModelArguments, ParallelArguments,
                             ExportArguments):
    """``megatron export``: HF <-> mcore conversion, LoRA merge, precision check."""


@dataclass
class RolloutCommandArguments(_ArgsMixin, DerivedArguments, RolloutServerArguments):
    """``megatron rollout``: serve a model with vLLM for GRPO's server mode."""


TRAINING_COMMANDS = ("pt", "sft", "rlhf")

COMMANDS: Dict[str, type] = {
    "pt": PtArguments,
    "sft": SftArguments,
    "rlhf": RLHFCommandArguments,
    "export": ExportCommandArguments,
    "rollout": RolloutCommandArguments,
}

COMMAND_HELP = {
    "pt": "continued pre-training (generation template, loss on all tokens)",
    "sft": "supervised fine-tuning",
    "rlhf": "preference / RL training (--rlhf_type dpo|kto|rm|grpo|...)",
    "export": "convert HF <-> mcore (--to_mcore / --to_hf), merge LoRA, check precision",
    "rollout": "serve a model with vLLM for megatron rlhf --vllm_mode server (generation + weight updates)",
}

SECTIONS = {
    "pt": (BaseArguments, ModelArguments, DataArguments, TemplateArguments, ParallelArguments, MegatronArguments,
           TunerArguments),
    "sft": (BaseArguments, ModelArguments, DataArguments, TemplateArguments, ParallelArguments, MegatronArguments,
            TunerArguments),
    "rlhf": (BaseArguments, ModelArguments, DataArguments, TemplateArguments, ParallelArguments, MegatronArguments,
             TunerArguments, RLHFArguments),
    "export": (BaseArguments, ModelArguments, ParallelArguments, ExportArguments),
    "rollout": (RolloutServerArguments,),
}

_TRAIN_ALIASES = {
    "output_dir": "save",
    "save_steps": "save_interval",
    "num_train_epochs": "max_epochs",
    "mcore_model": "load",
    # ms-swift 4.x names of 3.x arguments
    "tuner_type": "train_type",
    "logging_steps": "log_interval",
    "eval_steps": "eval_interval",
    "megatron_extra_kwargs": "extra_megatron_kwargs",
    "dataloader_num_workers": "num_workers",
    "ddp_backend": "distributed_backend",
    "mcore_adapter": "adapter_load",
}

# alias -> canonical name, per command
ALIASES: Dict[str, Dict[str, str]] = {
    "pt": dict(_TRAIN_ALIASES),
    "sft": dict(_TRAIN_ALIASES),
    "rlhf": dict(_TRAIN_ALIASES, teather_model="teacher_model", mcore_ref_model="ref_load",
                 mcore_ref_adapter="ref_adapter_load"),
    "export": {"ddp_backend": "distributed_backend"},
    "rollout": {},
}

# Names users bring from ms-swift's transformers-based trainer: shown as hints for unknown arguments.
HF_NAME_HINTS = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "global_batch_size",
    "max_steps": "train_iters",
    "logging_dir": "tensorboard_dir",
    "warmup_ratio": "lr_warmup_fraction",
    "warmup_steps": "lr_warmup_iters",
    "lr_scheduler_type": "lr_decay_style",
    "max_grad_norm": "clip_grad",
    "gradient_checkpointing": "recompute_granularity",
    "resume_from_checkpoint": "load",
    "deepspeed": "use_distributed_optimizer",
}


def command_class(command: str) -> type:
    return COMMANDS[command]


def field_infos(command: str) -> Dict[str, tuple]:
    """``name -> (dataclasses.Field, TypeInfo)`` for the user-settable fields of ``command``."""
    cached = _FIELD_CACHE.get(command)
    if cached is not None:
        return cached
    cls = COMMANDS[command]
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("derived"):
            continue
        out[f.name] = (f, type_info(hints[f.name]))
    _FIELD_CACHE[command] = out
    return out


def field_section(command: str, name: str) -> Optional[type]:
    for section in SECTIONS[command]:
        if name in section.__dict__.get("__annotations__", {}):
            return section
    return None


_FIELD_CACHE: Dict[str, Dict[str, tuple]] = {}

__all__ = ["SftArguments", "PtArguments", "RLHFCommandArguments", "ExportCommandArguments", "RolloutCommandArguments",
           "COMMANDS", "SECTIONS",
           "ALIASES", "TRAINING_COMMANDS", "COMMAND_HELP", "command_class", "field_infos", "field_section", "TypeInfo"]
