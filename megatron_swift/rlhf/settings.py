"""The ``megatron rlhf`` arguments DPO and KTO use, read once (args/support.py refuses the rest by name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .losses import DPOSettings, KTOSettings

# ms-swift / TRL < 0.20 called TRL's aot_unpaired "aot_pair"
LOSS_TYPE_ALIASES = {"aot_pair": "aot_unpaired"}


@dataclass(frozen=True)
class RLHFSettings:
    rlhf_type: str
    dpo: DPOSettings
    kto: KTOSettings
    ref_model: Optional[str]  # HF id / dir of the reference
    ref_load: Optional[str]  # mcore checkpoint of the reference (default: --load)
    ref_load_given: bool  # --ref_load / --mcore_ref_model given (not just defaulted to --load)
    center_rewards_coefficient: Optional[float] = None  # RM: + coef * mean((r_c + r_r)^2) (TRL)


def rlhf_settings(args) -> RLHFSettings:
    loss_type = LOSS_TYPE_ALIASES.get(args.loss_type, args.loss_type)
    dpo = DPOSettings(beta=args.beta, loss_type=loss_type, label_smoothing=args.label_smoothing,
                      f_divergence_type=args.f_divergence_type, reference_free=args.reference_free,
                      rpo_alpha=args.rpo_alpha)
    kto = KTOSettings(beta=args.beta, loss_type=args.loss_type, desirable_weight=args.desirable_weight,
                      undesirable_weight=args.undesirable_weight)
    return RLHFSettings(rlhf_type=args.rlhf_type, dpo=dpo, kto=kto, ref_model=args.ref_model, ref_load=args.ref_load,
                        ref_load_given="ref_load" in (args.explicit_args or []),
                        center_rewards_coefficient=args.center_rewards_coefficient)


def build_objective(settings: RLHFSettings, policy_chunks: list, hf_config, overrides: dict, where: str,
                    *, policy_is_start: bool, model_dir: Optional[str], use_hf: bool = False,
                    hub_token: Optional[str] = None, vocab_size: int, lora: bool = False):
    """The DPO or KTO objective; its reference model unless ``--reference_free`` (DPO): under LoRA the
    policy with its adapters off unless ``--ref_model`` / ``--ref_load`` name another model. RM: the
    Bradley-Terry objective (the model was built with its value head; no reference)."""
    from .objective import DPOObjective, KTOObjective, RMObjective

    if settings.rlhf_type == "rm":
        return RMObjective(settings.center_rewards_coefficient)

    reference = None
    needs_reference = settings.rlhf_type == "kto" or not settings.dpo.reference_free
    if needs_reference and lora and not settings.ref_model and not settings.ref_load_given:
        from .reference import DisabledAdapterReference

        reference = DisabledAdapterReference(policy_chunks, vocab_size)
    elif needs_reference:
        from .reference import build_reference

        ref_model_dir = None
        if settings.ref_model:
            from megatron_swift.data.pipeline import main_process_first
            from megatron_swift.model.hub import resolve_model_dir

            with main_process_first():
                ref_model_dir = resolve_model_dir(settings.ref_model, use_hf, hub_token, None)
        # --ref_load defaults to --load (ms-swift): that is the policy's starting weights, copied, unless
        # this run resumes (then --load holds trained weights: the reference is --model's weights)
        ref_load = settings.ref_load if settings.ref_load_given and not ref_model_dir else None
        reference = build_reference(policy_chunks, hf_config, overrides, where, ref_model_dir=ref_model_dir,
                                    ref_load=ref_load, policy_is_start=policy_is_start, model_dir=model_dir)
    if settings.rlhf_type == "kto":
        return KTOObjective(settings.kto, vocab_size, reference)
    return DPOObjective(settings.dpo, vocab_size, reference)
