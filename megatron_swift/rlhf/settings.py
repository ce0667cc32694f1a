"""The ``megatron rlhf`` arguments DPO, KTO, RM and GRPO use, read once (args/support.py refuses the rest by
name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .grpo import GRPOLossSettings
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
    grpo: Optional["GRPOSettings"] = None


@dataclass(frozen=True)
class VLLMSettings:
    """What the rollout engines (megatron_swift/rollout) read; GRPO itself only carries them."""
    mode: str  # colocate | server
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_model_len: Optional[int] = None
    max_num_seqs: Optional[int] = None
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    sleep_level: int = 0
    server_base_url: Optional[tuple] = None
    server_host: Optional[tuple] = None
    server_port: tuple = (8000,)
    server_timeout: float = 240.0
    server_group_port: Optional[tuple] = None


@dataclass(frozen=True)
class GRPOSettings:
    loss: GRPOLossSettings
    num_generations: int
    generation_batch_size: int  # completions per generation step (global)
    steps_per_generation: int
    num_iterations: int
    temperature: float
    max_completion_length: int
    top_k: int
    top_p: float
    repetition_penalty: float
    reward_funcs: tuple
    reward_weights: tuple
    advantage_estimator: str
    scale_rewards: str
    dynamic_sample: bool
    max_resample_times: int
    overlong_filter: bool
    log_completions: bool
    log_rollout_offpolicy_metrics: bool
    vllm: VLLMSettings
    seed: int = 42
    log_entropy: bool = False
    top_entropy_quantile: float = 1.0
    kl_in_reward: bool = False  # beta x KL(old || ref) subtracted from the rewards; no KL loss term

    @property
    def needs_reference(self) -> bool:
        return self.loss.beta != 0.0

    @property
    def rollout_logps_used(self) -> bool:
        return (self.loss.rollout_importance_sampling_mode is not None or self.log_rollout_offpolicy_metrics
                or self.loss.off_policy_sequence_mask_delta is not None)


def grpo_settings(args) -> GRPOSettings:
    loss = GRPOLossSettings(
        loss_type=args.loss_type, beta=args.beta, epsilon=args.epsilon, epsilon_high=args.epsilon_high,
        delta=args.delta, importance_sampling_level=args.importance_sampling_level, tau_pos=args.tau_pos,
        tau_neg=args.tau_neg, max_completion_length=args.max_completion_length,
        rollout_importance_sampling_mode=args.rollout_importance_sampling_mode,
        rollout_importance_sampling_threshold=args.rollout_importance_sampling_threshold,
        off_policy_sequence_mask_delta=args.off_policy_sequence_mask_delta)
    as_tuple = (lambda v: None if v is None else tuple(v))
    vllm = VLLMSettings(
        mode=args.vllm_mode, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        tensor_parallel_size=args.vllm_tensor_parallel_size, max_model_len=args.vllm_max_model_len,
        max_num_seqs=args.vllm_max_num_seqs, enforce_eager=args.vllm_enforce_eager,
        enable_prefix_caching=args.vllm_enable_prefix_caching, sleep_level=args.sleep_level,
        server_base_url=as_tuple(args.vllm_server_base_url), server_host=as_tuple(args.vllm_server_host),
        server_port=tuple(args.vllm_server_port), server_timeout=args.vllm_server_timeout,
        server_group_port=as_tuple(args.vllm_server_group_port))
    weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(args.reward_funcs)
    return GRPOSettings(
        loss=loss, num_generations=args.num_generations,
        generation_batch_size=args.generation_batch_size or args.global_batch_size * (args.steps_per_generation or 1),
        steps_per_generation=args.steps_per_generation or 1, num_iterations=args.num_iterations,
        temperature=args.temperature, max_completion_length=args.max_completion_length, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, reward_funcs=tuple(args.reward_funcs),
        reward_weights=tuple(float(w) for w in weights), advantage_estimator=args.advantage_estimator,
        scale_rewards=args.scale_rewards, dynamic_sample=args.dynamic_sample,
        max_resample_times=args.max_resample_times, overlong_filter=args.overlong_filter,
        log_completions=args.log_completions, log_rollout_offpolicy_metrics=args.log_rollout_offpolicy_metrics,
        vllm=vllm, seed=args.seed, log_entropy=args.log_entropy, top_entropy_quantile=args.top_entropy_quantile,
        kl_in_reward=args.kl_in_reward)


def rlhf_settings(args) -> RLHFSettings:
    loss_type = LOSS_TYPE_ALIASES.get(args.loss_type, args.loss_type)
    dpo = DPOSettings(beta=args.beta, loss_type=loss_type, label_smoothing=args.label_smoothing,
                      f_divergence_type=args.f_divergence_type, reference_free=args.reference_free,
                      rpo_alpha=args.rpo_alpha)
    kto = KTOSettings(beta=args.beta, loss_type=args.loss_type, desirable_weight=args.desirable_weight,
                      undesirable_weight=args.undesirable_weight)
    return RLHFSettings(rlhf_type=args.rlhf_type, dpo=dpo, kto=kto, ref_model=args.ref_model, ref_load=args.ref_load,
                        ref_load_given="ref_load" in (args.explicit_args or []),
                        center_rewards_coefficient=args.center_rewards_coefficient,
                        grpo=grpo_settings(args) if args.rlhf_type == "grpo" else None)


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
    if settings.rlhf_type == "kto" or not settings.dpo.reference_free:
        reference = reference_for(settings, policy_chunks, hf_config, overrides, where, model_dir=model_dir,
                                  policy_is_start=policy_is_start, use_hf=use_hf, hub_token=hub_token,
                                  lora=lora, vocab_size=vocab_size)
    if settings.rlhf_type == "kto":
        return KTOObjective(settings.kto, vocab_size, reference)
    return DPOObjective(settings.dpo, vocab_size, reference)


def reference_for(settings: RLHFSettings, policy_chunks: list, hf_config, overrides: dict, where: str, *,
                  model_dir: Optional[str], policy_is_start: bool, use_hf: bool = False,
                  hub_token: Optional[str] = None, lora: bool = False, vocab_size: Optional[int] = None):
    """The reference (rlhf/reference.py): under LoRA the policy with its adapters off, unless
    ``--ref_model`` / ``--ref_load`` name another model; else a frozen model from ``--ref_model`` /
    ``--ref_load`` / the policy's starting weights."""
    from .reference import DisabledAdapterReference, build_reference

    if lora and not settings.ref_model and not settings.ref_load_given:
        return DisabledAdapterReference(policy_chunks, vocab_size)

    ref_model_dir = None
    if settings.ref_model:
        from megatron_swift.data.pipeline import main_process_first
        from megatron_swift.model.hub import resolve_model_dir

        with main_process_first():
            ref_model_dir = resolve_model_dir(settings.ref_model, use_hf, hub_token, None)
    # --ref_load defaults to --load (ms-swift): that is the policy's starting weights, copied, unless
    # this run resumes (then --load holds trained weights: the reference is --model's weights)
    ref_load = settings.ref_load if settings.ref_load_given and not ref_model_dir else None
    return build_reference(policy_chunks, hf_config, overrides, where, ref_model_dir=ref_model_dir,
                           ref_load=ref_load, policy_is_start=policy_is_start, model_dir=model_dir)
