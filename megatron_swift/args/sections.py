"""Argument sections, one dataclass per section of the ms-swift parameter reference.

Names and defaults follow ``/work/shared/SPEC.md`` and the seed reference
(``command-line-parameters.zh.md``). A default of ``None`` on a field whose help says "derived"
or "default: ..." is filled in by :mod:`megatron_swift.args.validate`; after parsing, code may
trust every field. The per-command classes that compose these sections live in
:mod:`megatron_swift.args.commands`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

from megatron_swift.args._fields import arg, derived

DTYPES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16"}


@dataclass
class BaseArguments:
    seed: int = arg(42, help="Random seed (model init, dropout, data order).")
    use_hf: bool = arg(False, help="Download models/datasets from Hugging Face instead of ModelScope.")
    hub_token: Optional[str] = arg(None, help="Hub token for private models/datasets.")
    model_kwargs: Optional[Dict] = arg(None, help="Extra model-specific arguments as a JSON object.")
    custom_register_path: List[str] = arg(factory=list,
                                          help="Python files that register custom models/templates/datasets.")
    external_plugins: List[str] = arg(factory=list, help="Python plugin files to import before running.")
    ddp_timeout: int = arg(18000000, gt=0, help="Timeout of collective operations (process-group timeout), in "
                                                "seconds; --distributed_timeout_minutes sets the same timeout.")


@dataclass
class ModelArguments:
    model: Optional[str] = arg(None, help="Model id (org/name) or local Hugging Face model directory.")
    model_type: Optional[str] = arg(None, help="Model type; default: chosen from config.json architectures.")
    model_revision: Optional[str] = arg(None, help="Model revision on the hub.")
    task_type: str = arg("causal_lm", choices=("causal_lm", "seq_cls", "embedding"), help="Task type.")
    torch_dtype: Optional[str] = arg(None, choices=DTYPES, value_aliases=DTYPE_ALIASES,
                                     help="Weight dtype; default: read from config.json (bf16/fp16 follow it).")
    attn_impl: Optional[str] = arg(None, choices=("flash_attn", "sdpa", "eager"),
                                   help="Attention implementation of the HF model; default: from config.json.")
    num_labels: Optional[int] = arg(None, ge=1, help="Number of labels (task_type seq_cls).")
    problem_type: Optional[str] = arg(None, choices=("regression", "single_label_classification",
                                                     "multi_label_classification"),
                                      help="Classification problem type (task_type seq_cls).")
    rope_scaling: Optional[Union[str, Dict]] = arg(None, help="RoPE scaling type (linear|dynamic|yarn) or a JSON "
                                                              "object; default: from config.json.")
    trust_remote_code: bool = arg(False, help="Allow the model's own Python code (never used while parsing).")
    local_repo_path: Optional[str] = arg(None, help="Local clone of a GitHub repo some models need.")


@dataclass
class DataArguments:
    dataset: List[str] = arg(factory=list, help="Training datasets: id_or_path[:subset][#N], space separated.")
    val_dataset: List[str] = arg(factory=list, help="Validation datasets, same syntax as --dataset.")
    split_dataset_ratio: float = arg(0.01, ge=0.0, lt=1.0,
                                     help="Fraction of the training set held out for validation when no val_dataset.")
    data_seed: int = arg(42, help="Random seed of dataset sampling/shuffling.")
    dataset_num_proc: int = arg(1, ge=1, help="Processes for dataset preprocessing.")
    load_from_cache_file: bool = arg(True, help="Reuse the datasets cache of preprocessed data.")
    dataset_shuffle: bool = arg(True, help="Shuffle the training dataset.")
    val_dataset_shuffle: bool = arg(False, help="Shuffle the validation dataset.")
    streaming: bool = arg(False, help="Stream the datasets (needs --train_iters).")
    interleave_prob: Optional[List[float]] = arg(None, help="Interleave datasets with these probabilities instead of "
                                                            "concatenating.")
    stopping_strategy: str = arg("first_exhausted", choices=("first_exhausted", "all_exhausted"),
                                 help="When interleaving stops.")
    shuffle_buffer_size: int = arg(1000, ge=1, help="Shuffle buffer of streaming datasets.")
    download_mode: str = arg("reuse_dataset_if_exists", choices=("reuse_dataset_if_exists", "force_redownload"),
                             help="Dataset download mode.")
    columns: Optional[Dict] = arg(None, help="Column renames as a JSON object, e.g. '{\"text1\": \"query\"}'.")
    strict: bool = arg(False, help="Raise on a bad row instead of dropping it.")
    remove_unused_columns: bool = arg(True, help="Drop dataset columns the template does not use.")
    model_name: Optional[List[str]] = arg(None, help="Model name (Chinese English) for self-cognition data.")
    model_author: Optional[List[str]] = arg(None, help="Model author (Chinese English) for self-cognition data.")
    custom_dataset_info: List[str] = arg(factory=list, help="JSON files registering custom datasets.")
    lazy_tokenize: bool = arg(False, help="Tokenize rows when they are read instead of before training.")
    dataset_preview: int = arg(0, ge=0, help="Dry run: print N encoded training samples with the "
                                             "loss-masked spans marked, then exit without training.")


LOSS_SCALES = ("default", "last_round", "all", "ignore_empty_think", "react", "hermes", "qwen", "agentflan",
               "alpha_umi")


@dataclass
class TemplateArguments:
    template: Optional[str] = arg(None, help="Chat template; default: the model's template.")
    system: Optional[str] = arg(None, help="System prompt (text or a .txt file); default: the template's.")
    max_length: Optional[int] = arg(None, ge=1, help="Max tokens per sample; default: the model's max length.")
    truncation_strategy: str = arg("delete", choices=("delete", "left", "right"),
                                   help="What to do with samples longer than max_length.")
    max_pixels: Optional[int] = arg(None, ge=1, help="Max pixels (H*W) of input images.")
    agent_template: Optional[str] = arg(None, help="Agent (tool-call) template; default: from the model.")
    use_chat_template: bool = arg(True, help="Use the chat template (true) or the generation template (false).")
    padding_free: bool = arg(True, help="Flatten batches without padding (THD format).")
    padding_side: str = arg("right", choices=("left", "right"), help="Padding side when padding is used.")
    loss_scale: str = arg("default", choices=LOSS_SCALES, help="Which tokens carry loss and with what weight.")
    disable_ignore_empty_think: bool = arg(
        False, help="Train the empty <think></think> block that hybrid-thinking templates (qwen3) put before "
                    "answers without reasoning; by default it carries no loss, as in ms-swift.")
    response_prefix: Optional[str] = arg(None, help="Prefix of every response; default: from the template.")
    template_backend: str = arg("swift", choices=("swift", "jinja"),
                                help="Template backend (jinja is inference only).")
    packing: bool = arg(False, help="Pack samples into sequences of max_length.")
    packing_cache: Optional[str] = arg(None, help="Directory of the packing cache; default: $MODELSCOPE_CACHE.")


@dataclass
class ParallelArguments:
    tensor_model_parallel_size: int = arg(1, ge=1, help="Tensor parallel size (TP).")
    pipeline_model_parallel_size: int = arg(1, ge=1, help="Pipeline parallel size (PP).")
    virtual_pipeline_model_parallel_size: Optional[int] = arg(None, ge=1, help="Virtual pipeline stages per rank.")
    decoder_first_pipeline_num_layers: Optional[int] = arg(None, ge=0, help="Layers on the first pipeline stage.")
    decoder_last_pipeline_num_layers: Optional[int] = arg(None, ge=0, help="Layers on the last pipeline stage.")
    sequence_parallel: bool = arg(False, help="Sequence parallelism (needs TP > 1).")
    context_parallel_size: int = arg(1, ge=1, help="Context parallel size (CP).")
    expert_model_parallel_size: int = arg(1, ge=1, help="Expert parallel size (EP).")
    expert_tensor_parallel_size: Optional[int] = arg(None, ge=1, help="TP size of the experts; default: TP.")
    distributed_backend: Optional[str] = arg(None, choices=("nccl", "gloo"),
                                             help="Collective backend; default: nccl on GPU, gloo on CPU.")


RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "moe_act", "layernorm", "mla_up_proj")


@dataclass
class MegatronArguments(ParallelArguments):
    # batch / recompute
    micro_batch_size: int = arg(1, ge=1, help="Samples per rank per forward pass.")
    global_batch_size: int = arg(16, ge=1, help="Samples per optimizer step (= micro x DP x grad-accum).")
    recompute_granularity: str = arg("selective", choices=("full", "selective", "none"),
                                     help="Activation recomputation.")
    recompute_method: Optional[str] = arg(None, choices=("uniform", "block"), help="How full recompute splits layers.")
    recompute_num_layers: Optional[int] = arg(None, ge=1, help="Layers per recompute unit (full recompute).")
    recompute_modules: List[str] = arg(factory=lambda: ["core_attn"], choices=RECOMPUTE_MODULES,
                                       help="Modules recomputed with selective recompute.")
    deterministic_mode: bool = arg(False, help="Deterministic kernels and reductions.")
    # length of training
    train_iters: Optional[int] = arg(None, ge=1, help="Training iterations (or give --max_epochs).")
    max_epochs: Optional[int] = arg(None, ge=1, help="Epochs; iterations are computed from the data.")
    # learning rate
    lr: Optional[float] = arg(None, gt=0.0, help="Learning rate; default: 1e-5 full, 1e-4 LoRA.")
    lr_decay_style: str = arg("cosine", choices=("cosine", "linear", "constant"), help="LR decay.")
    lr_decay_iters: Optional[int] = arg(None, ge=1, help="Iterations of LR decay; default: train_iters.")
    lr_warmup_iters: int = arg(0, ge=0, help="Warmup iterations.")
    lr_warmup_fraction: Optional[float] = arg(None, ge=0.0, le=1.0, help="Warmup as a fraction of lr_decay_iters.")
    min_lr: float = arg(0.0, ge=0.0, help="Minimum learning rate.")
    # regularization / optimizer
    weight_decay: float = arg(0.1, ge=0.0, help="Weight decay.")
    clip_grad: float = arg(1.0, ge=0.0, help="Gradient clipping by global norm (0: off).")
    adam_beta1: float = arg(0.9, ge=0.0, lt=1.0, help="Adam beta1.")
    adam_beta2: float = arg(0.95, ge=0.0, lt=1.0, help="Adam beta2.")
    adam_eps: float = arg(1e-8, gt=0.0, help="Adam epsilon.")
    sgd_momentum: float = arg(0.9, ge=0.0, help="SGD momentum.")
    optimizer: str = arg("adam", choices=("adam", "sgd"), help="Optimizer.")
    optimizer_cpu_offload: bool = arg(False, help="Keep optimizer states on CPU.")
    optimizer_offload_fraction: float = arg(1.0, ge=0.0, le=1.0, help="Fraction of optimizer states offloaded.")
    # checkpoints
    save: Optional[str] = arg(None, help="Checkpoint directory; default: megatron_output/<model name>.")
    add_version: bool = arg(True, help="Save under <save>/v<N>-<timestamp>/.")
    save_interval: int = arg(500, ge=1, help="Iterations between checkpoints; always saves at the end.")
    save_total_limit: Optional[int] = arg(None, ge=1, help="Keep only the newest N checkpoints (never the one "
                                                            "`latest` names or one being written); none: keep all.")
    save_safetensors: bool = arg(False, help="Also write Hugging Face safetensors (+ config, tokenizer) of each "
                                             "saved iteration to <save>/iter_XXXXXXX-hf/.")
    async_save: bool = arg(False, help="Write checkpoints in the background while training continues "
                                       "(torch_dist).")
    overwrite_output_dir: bool = arg(False, help="Start a new run in a --save directory that already holds "
                                                 "checkpoints (they are deleted); without it that is refused.")
    exit_signal_handler: bool = arg(False, help="On SIGTERM or SIGUSR1: finish the current step, save, exit 0 "
                                               "(preemption; resume with --load = --save).")
    exit_interval: Optional[int] = arg(None, ge=1, help="Save and exit after every N-th iteration (a job that "
                                                       "fits a time slot).")
    exit_duration_in_mins: Optional[float] = arg(None, gt=0.0, help="Save and exit once training has run this "
                                                                    "many minutes.")
    load: Optional[str] = arg(None, help="mcore checkpoint to load (parent of iter_*).")
    finetune: bool = arg(False, help="Load weights only and reset the iteration to 0.")
    no_save_optim: bool = arg(False, help="Do not save optimizer states.")
    no_save_rng: bool = arg(False, help="Do not save RNG states.")
    no_load_optim: bool = arg(False, help="Do not load optimizer states.")
    no_load_rng: bool = arg(False, help="Do not load RNG states.")
    ckpt_format: str = arg("torch_dist", choices=("torch_dist", "torch"), help="Checkpoint format.")
    auto_detect_ckpt_format: bool = arg(True, help="Detect the format of the --load checkpoint (torch_dist, or "
                                                   "Megatron's legacy per-rank torch files).")
    exit_on_missing_checkpoint: bool = arg(True, help="Fail when --load has no checkpoint.")
    no_initialization: bool = arg(True, help="Skip random initialisation of weights that are loaded anyway "
                                             "(models without weights are always initialised).")
    use_cpu_initialization: bool = arg(False, help="Initialise weights on the CPU, then move them to the device.")
    # parallelism extras
    use_distributed_optimizer: bool = arg(True, help="Shard optimizer states across data-parallel ranks.")
    overlap_grad_reduce: Optional[bool] = arg(None, help="Overlap gradient reduce-scatter with backward; default: "
                                                        "on GPU with the distributed optimizer and DP > 1.")
    overlap_param_gather: Optional[bool] = arg(None, help="Overlap parameter all-gather with forward; default: "
                                                         "as --overlap_grad_reduce.")
    tp_comm_overlap: bool = arg(False, help="Overlap TP communication with GEMMs (Transformer Engine).")
    distributed_timeout_minutes: Optional[int] = arg(None, ge=1, help="Process-group timeout in minutes (the "
                                                                      "same timeout as --ddp_timeout).")
    # MoE
    num_experts: Optional[int] = arg(None, ge=1, help="Number of experts; default: from config.json.")
    moe_ffn_hidden_size: Optional[int] = arg(None, ge=1, help="Expert FFN size; default: from config.json.")
    moe_shared_expert_intermediate_size: Optional[int] = arg(None, ge=1, help="Shared-expert FFN size; "
                                                                               "default: from config.json.")
    moe_router_topk: Optional[int] = arg(None, ge=1, help="Experts per token; default: from config.json.")
    moe_router_pre_softmax: Optional[bool] = arg(None, help="Softmax before top-k; default: from config.json.")
    moe_aux_loss_coeff: Optional[float] = arg(None, ge=0.0, help="Load-balancing loss weight; "
                                                                 "default: from config.json.")
    moe_router_dtype: Optional[str] = arg("fp32", choices=("fp32", "fp64"), help="Router dtype (none: model dtype).")
    moe_token_dispatcher_type: str = arg("alltoall", choices=("allgather", "alltoall", "flex"),
                                         help="Token dispatcher.")
    moe_grouped_gemm: Optional[bool] = arg(None, help="Grouped GEMM for experts; default: when available.")
    moe_router_load_balancing_type: str = arg("aux_loss", choices=("aux_loss", "seq_aux_loss", "sinkhorn", "none"),
                                              help="Load balancing.")
    moe_z_loss_coeff: Optional[float] = arg(None, ge=0.0, help="Router z-loss weight.")
    moe_expert_capacity_factor: Optional[float] = arg(None, gt=0.0, help="Expert capacity factor (token dropping).")
    moe_permute_fusion: bool = arg(False, help="Fused token permutation (GPU).")
    moe_enable_deepep: bool = arg(False, help="DeepEP token dispatch with --moe_token_dispatcher_type flex (GPU).")
    moe_shared_expert_overlap: bool = arg(False, help="Overlap the shared expert with token dispatch (GPU).")
    # fusions / kernels: a positive flag left unset means "when this machine has the kernel"; true
    # demands it (refused where it is missing), false (or the no_* flag) turns it off
    cross_entropy_loss_fusion: bool = arg(False, help="Fused cross entropy.")
    cross_entropy_fusion_impl: str = arg("native", choices=("native", "te"),
                                         help="Fused cross-entropy implementation (te: Transformer Engine, GPU).")
    attention_backend: str = arg("auto", choices=("flash", "fused", "unfused", "local", "auto"),
                                 help="Attention backend: Transformer Engine's flash/fused/unfused (GPU), local "
                                      "(megatron's own), auto (TE picks; local without TE).")
    masked_softmax_fusion: Optional[bool] = arg(None, help="Masked softmax fusion; default: when available.")
    bias_dropout_fusion: Optional[bool] = arg(None, help="Bias-dropout fusion; default: when available.")
    bias_swiglu_fusion: Optional[bool] = arg(None, help="Bias-SwiGLU fusion; default: when available.")
    apply_rope_fusion: Optional[bool] = arg(None, help="RoPE fusion; default: when available.")
    gradient_accumulation_fusion: Optional[bool] = arg(None, help="Gradient-accumulation fusion (NVIDIA apex on "
                                                                  "GPU, torch addmm on CPU); default: when available.")
    no_masked_softmax_fusion: bool = arg(False, help="Disable the masked softmax fusion.")
    no_bias_dropout_fusion: bool = arg(False, help="Disable the bias-dropout fusion.")
    no_bias_swiglu_fusion: bool = arg(False, help="Disable the bias-SwiGLU fusion.")
    no_rope_fusion: bool = arg(False, help="Disable the RoPE fusion.")
    no_gradient_accumulation_fusion: bool = arg(False, help="Disable the gradient-accumulation fusion.")
    calculate_per_token_loss: bool = arg(True, help="Normalize the loss by tokens across the global batch.")
    # precision
    bf16: Optional[bool] = arg(None, help="bfloat16 training; default: follows torch_dtype.")
    fp16: Optional[bool] = arg(None, help="float16 training; default: follows torch_dtype.")
    attention_softmax_in_fp32: bool = arg(True, help="Attention softmax in float32.")
    apply_query_key_layer_scaling: Optional[bool] = arg(None, help="Scale Q.K^T by 1/layer number (fp16 "
                                                                   "stability); default: true with fp16.")
    use_precision_aware_optimizer: bool = arg(False, help="Transformer Engine's precision-aware Adam (GPU): main "
                                                          "params / grads / moments in the dtypes below.")
    main_grads_dtype: str = arg("fp32", choices=("fp32", "bf16"), help="Main-gradient dtype (precision-aware "
                                                                        "optimizer).")
    main_params_dtype: str = arg("fp32", choices=("fp32", "fp16"), help="Main-parameter dtype (precision-aware "
                                                                         "optimizer).")
    exp_avg_dtype: str = arg("fp32", choices=("fp32", "fp16", "bf16", "fp8"), help="Adam first-moment dtype "
                                                                                   "(precision-aware optimizer).")
    exp_avg_sq_dtype: str = arg("fp32", choices=("fp32", "fp16", "bf16", "fp8"), help="Adam second-moment dtype "
                                                                                      "(precision-aware optimizer).")
    # logging / eval
    log_interval: int = arg(5, ge=1, help="Iterations between log lines.")
    report_to: Optional[List[str]] = arg(None, choices=("tensorboard", "wandb", "swanlab", "all", "none"),
                                         help="Where metrics go besides logging.jsonl; default: tensorboard, plus "
                                              "wandb when --wandb_project is given.")
    tensorboard_dir: Optional[str] = arg(None, help="TensorBoard directory; default: <save>/runs (set by trainer).")
    tensorboard_log_interval: int = arg(1, ge=1, help="Iterations between TensorBoard points.")
    tensorboard_queue_size: int = arg(50, ge=1, help="TensorBoard writer queue (events buffered before a flush).")
    log_timers_to_tensorboard: bool = arg(True, help="Step, data and save times to TensorBoard.")
    log_memory_to_tensorboard: bool = arg(True, help="Memory (host RSS; device allocated on GPU) to TensorBoard.")
    log_validation_ppl_to_tensorboard: bool = arg(True, help="Validation perplexity to TensorBoard.")
    no_log_learning_rate_to_tensorboard: bool = arg(False, help="Leave the learning rate out of TensorBoard.")
    log_params_norm: bool = arg(False, help="Log the L2 norm of all parameters.")
    log_throughput: bool = arg(False, help="Log model TFLOP/s per device (6 x params x tokens + attention).")
    logging_level: Optional[str] = arg(None, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                                       help="Log level of megatron-swift and megatron-core; default: INFO on rank 0, "
                                            "WARNING elsewhere.")
    wandb_project: Optional[str] = arg(None, help="Weights & Biases project (enables wandb).")
    wandb_exp_name: Optional[str] = arg(None, help="Weights & Biases run name.")
    wandb_save_dir: Optional[str] = arg(None, help="Local directory of wandb files; default: <save>.")
    profile: bool = arg(False, help="Profile iterations --profile_step_start to --profile_step_end - 1 (with "
                                    "--use_pytorch_profiler true): <save>/profile/rank<r>.{trace.json,summary.txt}.")
    use_pytorch_profiler: bool = arg(False, help="Use torch.profiler for --profile (the only mode built).")
    profile_step_start: int = arg(10, ge=1, help="First profiled iteration.")
    profile_step_end: int = arg(12, ge=2, help="First iteration after the profiled ones.")
    profile_ranks: List[int] = arg(factory=lambda: [0], help="Global ranks that profile.")
    eval_iters: int = arg(-1, ge=-1, help="Evaluation iterations (-1: the whole validation set).")
    eval_interval: Optional[int] = arg(None, ge=1, help="Iterations between evaluations; default: save_interval.")
    manual_gc: bool = arg(False, help="Disable Python's automatic garbage collection; collect every "
                                      "--manual_gc_interval steps instead.")
    manual_gc_interval: int = arg(0, ge=0, help="Steps between manual garbage collections (0: only at start).")
    # model shape overrides (None = derived from the HF config.json)
    num_layers: Optional[int] = arg(None, ge=1, help="Override: number of layers.")
    hidden_size: Optional[int] = arg(None, ge=1, help="Override: hidden size.")
    ffn_hidden_size: Optional[int] = arg(None, ge=1, help="Override: FFN hidden size.")
    num_attention_heads: Optional[int] = arg(None, ge=1, help="Override: attention heads.")
    num_query_groups: Optional[int] = arg(None, ge=1, help="Override: KV heads (query groups).")
    kv_channels: Optional[int] = arg(None, ge=1, help="Override: head dimension.")
    rotary_base: Optional[float] = arg(None, gt=0.0, help="Override: RoPE base (rope_theta).")
    normalization: Optional[str] = arg(None, choices=("RMSNorm", "LayerNorm"), help="Override: normalization.")
    group_query_attention: Optional[bool] = arg(None, help="Override: grouped-query attention (default: "
                                                           "num_query_groups < num_attention_heads).")
    max_position_embeddings: Optional[int] = arg(None, ge=1, help="Override: longest position RoPE is prepared "
                                                                  "for.")
    position_embedding_type: str = arg("rope", choices=("learned_absolute", "rope", "mrope", "relative", "none"),
                                       help="Position embedding (the supported families use rope).")
    rotary_percent: float = arg(1.0, gt=0.0, le=1.0, help="Fraction of each head rotated by RoPE.")
    attention_dropout: float = arg(0.0, ge=0.0, lt=1.0, help="Dropout on attention probabilities.")
    hidden_dropout: float = arg(0.0, ge=0.0, lt=1.0, help="Dropout on the attention and MLP outputs.")
    disable_bias_linear: bool = arg(True, help="No bias in the linear layers (QKV bias: --add_qkv_bias).")
    norm_epsilon: Optional[float] = arg(None, gt=0.0, help="Override: normalization epsilon.")
    swiglu: Optional[bool] = arg(None, help="Override: SwiGLU MLP.")
    untie_embeddings_and_output_weights: Optional[bool] = arg(None, help="Override: separate output layer.")
    add_qkv_bias: Optional[bool] = arg(None, help="Override: bias on QKV.")
    qk_layernorm: Optional[bool] = arg(None, help="Override: norm on Q and K.")
    padded_vocab_size: Optional[int] = arg(None, ge=1, help="Override: padded vocabulary size.")
    transformer_impl: Optional[str] = arg(None, choices=("transformer_engine", "local"),
                                          help="Layer implementation; default: transformer_engine when installed.")
    # training extras
    dataloader_type: str = arg("cyclic", choices=("single", "cyclic", "external"),
                               help="Data order: cyclic (epoch after epoch, order from --dataset_shuffle/"
                                    "--data_seed).")
    num_workers: int = arg(4, ge=0, help="Micro-batch groups prepared ahead of the running step by a background "
                                         "thread (0: prepared inline).")
    no_create_attention_mask_in_dataloader: bool = arg(True, help="Batches carry no attention mask (causal "
                                                                  "attention; padding-free batches use cu_seqlens).")
    extra_megatron_kwargs: Optional[Dict] = arg(None, help="JSON object of extra TransformerConfig fields.")


@dataclass
class TunerArguments:
    train_type: str = arg("full", choices=("full", "lora"), help="Full training or LoRA.")
    lora_rank: int = arg(8, ge=1, help="LoRA rank.")
    lora_alpha: int = arg(32, ge=1, help="LoRA alpha.")
    lora_dropout: float = arg(0.05, ge=0.0, lt=1.0, help="LoRA dropout.")
    lora_bias: str = arg("none", choices=("none", "all"), help="Train biases with LoRA.")
    lora_dtype: Optional[str] = arg(None, choices=DTYPES, value_aliases=DTYPE_ALIASES,
                                    help="dtype of LoRA weights; default: the model's.")
    use_rslora: bool = arg(False, help="Rank-stabilized LoRA.")
    use_dora: bool = arg(False, help="DoRA.")
    target_modules: List[str] = arg(factory=lambda: ["all-linear"],
                                    help="LoRA targets: all-linear, mcore names (linear_qkv ...) or HF names.")
    target_regex: Optional[str] = arg(None, help="Regex of LoRA targets (overrides target_modules).")
    modules_to_save: List[str] = arg(factory=list, help="Extra modules trained and saved in full.")
    init_weights: str = arg("true", help="LoRA init: true, false, gaussian, pissa, pissa_niter_<N>.")
    lorap_lr_ratio: Optional[float] = arg(None, gt=0.0, help="LoRA+ learning-rate ratio (B vs A).")
    adapters: List[str] = arg(factory=list, help="HF (PEFT) adapters to load.")
    adapter_load: Optional[str] = arg(None, help="mcore LoRA checkpoint to load.")
    merge_lora: bool = arg(False, help="Merge LoRA into the base weights when saving.")
    freeze_parameters: List[str] = arg(factory=list, help="Prefixes of parameters to freeze (full training).")
    freeze_parameters_regex: Optional[str] = arg(None, help="Regex of parameters to freeze.")
    freeze_parameters_ratio: float = arg(0.0, ge=0.0, le=1.0, help="Freeze this fraction of parameters, bottom up.")
    trainable_parameters: List[str] = arg(factory=list, help="Prefixes of parameters kept trainable (wins over "
                                                             "freezing).")
    trainable_parameters_regex: Optional[str] = arg(None, help="Regex of parameters kept trainable.")


RLHF_TYPES = ("dpo", "orpo", "simpo", "kto", "cpo", "rm", "ppo", "grpo", "gkd")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "aot_pair", "discopop", "apo_zero", "apo_down")  # aot_pair: old name of aot_unpaired
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")


@dataclass
class RLHFArguments:
    rlhf_type: str = arg("dpo", choices=RLHF_TYPES, help="Alignment algorithm.")
    ref_load: Optional[str] = arg(None, help="mcore checkpoint of the reference model; default: --load.")
    ref_model: Optional[str] = arg(None, help="Hugging Face reference model (id or directory); default: the "
                                              "policy's starting weights.")
    ref_adapter_load: Optional[str] = arg(None, help="mcore LoRA checkpoint of the reference model.")
    beta: Optional[float] = arg(None, ge=0.0, help="KL coefficient; default: 0.1 (simpo 2.0, grpo 0.04, gkd 0.5).")
    rpo_alpha: Optional[float] = arg(1.0, ge=0.0, help="Weight of the SFT loss added to DPO (none: off).")
    reference_free: bool = arg(False, help="DPO without a reference model.")
    label_smoothing: float = arg(0.0, ge=0.0, le=0.5, help="DPO label smoothing.")
    f_divergence_type: str = arg("reverse_kl", choices=("reverse_kl", "js_divergence", "alpha_divergence"),
                                 help="DPO f-divergence.")
    loss_type: Optional[str] = arg(None, help="Loss variant (TRL names); default: sigmoid (dpo), kto (kto), "
                                              "grpo (grpo).")
    desirable_weight: float = arg(1.0, ge=0.0, help="KTO weight of desirable responses.")
    undesirable_weight: float = arg(1.0, ge=0.0, help="KTO weight of undesirable responses.")
    center_rewards_coefficient: Optional[float] = arg(None, ge=0.0, help="RM: weight of the reward-centring "
                                                      "term mean((r_chosen + r_rejected)^2) (TRL); default: off.")
    cpo_alpha: float = arg(1.0, ge=0.0, help="NLL weight in CPO/SimPO.")
    simpo_gamma: float = arg(1.0, help="SimPO reward margin.")
    # generation-based algorithms (grpo; gkd/ppo are not built). Batch sizes count completions.
    max_completion_length: int = arg(512, ge=1, help="Max generated tokens per completion (grpo).")
    temperature: float = arg(0.9, gt=0.0, help="Sampling temperature; training log-probs use the same.")
    top_k: int = arg(-1, ge=-1, help="Sampling top-k (-1: off).")
    top_p: float = arg(1.0, gt=0.0, le=1.0, help="Sampling top-p.")
    repetition_penalty: float = arg(1.0, gt=0.0, help="Sampling repetition penalty.")
    num_generations: int = arg(8, ge=1, help="Completions per prompt (GRPO's G).")
    generation_batch_size: Optional[int] = arg(None, ge=1, help="Completions sampled per generation step; default: "
                                                                "global_batch_size x steps_per_generation.")
    steps_per_generation: Optional[int] = arg(None, ge=1, help="Optimizer steps per generation step; default 1.")
    num_iterations: int = arg(1, ge=1, help="Updates per generated batch.")
    reward_funcs: List[str] = arg(factory=list, help="Reward functions: accuracy, format, cosine, repetition, "
                                                    "soft_overlong, or names registered in an --external_plugins "
                                                    "file (megatron_swift.plugin.orms).")
    reward_weights: Optional[List[float]] = arg(None, help="Weight of each reward; default: all 1.")
    reward_model: Optional[str] = arg(None, help="Reward model id or path.")
    teacher_model: Optional[str] = arg(None, help="Teacher model for gkd.")
    epsilon: float = arg(0.2, ge=0.0, help="GRPO clip epsilon (lower bound 1 - epsilon).")
    epsilon_high: Optional[float] = arg(None, ge=0.0, help="GRPO upper clip epsilon; default: epsilon (cispo: "
                                                           "the ratio cap, ~5).")
    delta: Optional[float] = arg(None, gt=1.0, help="Two-sided GRPO: cap of the unclipped ratio (INTELLECT-2); "
                                                    "> 1 + epsilon_high.")
    importance_sampling_level: str = arg("token", choices=("token", "sequence", "sequence_token"),
                                         help="Importance ratio per token, per sequence (GSPO) or GSPO-token.")
    tau_pos: float = arg(1.0, gt=0.0, help="SAPO gate temperature for positive advantages.")
    tau_neg: float = arg(1.05, gt=0.0, help="SAPO gate temperature for negative advantages.")
    advantage_estimator: str = arg("grpo", choices=("grpo", "rloo", "reinforce_plus_plus"),
                                   help="Baseline of the advantages.")
    scale_rewards: str = arg("group", choices=("group", "batch", "none", "gdpo"),
                             help="Advantages divided by the group's / batch's reward std, or not (Dr. GRPO); "
                                  "gdpo: each reward normalised per group.")
    kl_in_reward: bool = arg(False, help="Subtract beta x KL from the rewards instead of a KL loss term.")
    dynamic_sample: bool = arg(False, help="Resample groups whose rewards have zero spread (DAPO).")
    max_resample_times: int = arg(3, ge=0, help="Resampling limit with dynamic_sample.")
    overlong_filter: bool = arg(False, help="Drop truncated completions from the loss.")
    log_completions: bool = arg(False, help="Write prompts, completions and rewards to <save>/completions.jsonl.")
    log_entropy: bool = arg(False, help="Log the completion tokens' entropy.")
    top_entropy_quantile: float = arg(1.0, gt=0.0, le=1.0, help="Train only the highest-entropy tokens "
                                                                "(this quantile).")
    rollout_importance_sampling_mode: Optional[str] = arg(
        None, choices=("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
        help="Correct the rollout engine / trainer mismatch with importance weights exp(logp_old - logp_rollout).")
    rollout_importance_sampling_threshold: float = arg(2.0, gt=0.0, help="Cap (truncate) or cut-off (mask) of the "
                                                                         "rollout importance weights.")
    log_rollout_offpolicy_metrics: bool = arg(False, help="Log the rollout / trainer log-prob mismatch metrics "
                                                          "(always on with rollout_importance_sampling_mode).")
    off_policy_sequence_mask_delta: Optional[float] = arg(None, gt=0.0, help="Drop completions whose mean "
                                                          "logp_rollout - logp exceeds this and whose advantage "
                                                          "is negative.")
    cosine_min_len_value_wrong: float = arg(-0.5, help="cosine reward: wrong answer, length 0.")
    cosine_max_len_value_wrong: float = arg(0.0, help="cosine reward: wrong answer, max length.")
    cosine_min_len_value_correct: float = arg(1.0, help="cosine reward: correct answer, length 0.")
    cosine_max_len_value_correct: float = arg(0.5, help="cosine reward: correct answer, max length.")
    cosine_max_len: Optional[int] = arg(None, ge=1, help="cosine reward: max length; default max_completion_length.")
    repetition_n_grams: int = arg(3, ge=1, help="repetition reward: n-gram size.")
    repetition_max_penalty: float = arg(-1.0, le=0.0, help="repetition reward: penalty when every n-gram repeats.")
    soft_max_length: Optional[int] = arg(None, ge=1, help="soft_overlong reward: L_max; default "
                                                          "max_completion_length.")
    soft_cache_length: Optional[int] = arg(None, ge=1, help="soft_overlong reward: L_cache (penalty ramp length).")
    use_vllm: bool = arg(True, help="Generate with vLLM (GRPO needs it).")
    vllm_mode: Optional[str] = arg(None, choices=("colocate", "server"), help="vLLM in each training process "
                                                                              "(colocate) or a rollout server.")
    vllm_server_base_url: Optional[List[str]] = arg(None, help="Rollout server base URLs (server mode); override "
                                                               "host and port.")
    vllm_server_host: Optional[List[str]] = arg(None, help="Rollout server hosts (server mode).")
    vllm_server_port: List[int] = arg(factory=lambda: [8000], help="Rollout server ports (server mode).")
    vllm_server_timeout: float = arg(240.0, gt=0.0, help="Seconds to wait for the rollout server.")
    vllm_server_group_port: Optional[List[int]] = arg(None, help="Weight-sync group ports (server mode).")
    vllm_gpu_memory_utilization: float = arg(0.9, gt=0.0, le=1.0, help="vLLM GPU memory fraction (colocate).")
    vllm_tensor_parallel_size: int = arg(1, ge=1, help="vLLM tensor parallel size (colocate).")
    vllm_max_model_len: Optional[int] = arg(None, ge=1, help="vLLM max model length (colocate).")
    vllm_max_num_seqs: Optional[int] = arg(None, ge=1, help="vLLM max concurrent sequences (colocate).")
    vllm_enforce_eager: bool = arg(False, help="vLLM eager mode (colocate).")
    vllm_enable_prefix_caching: bool = arg(True, help="vLLM prefix caching (colocate).")
    sleep_level: int = arg(0, ge=0, le=2, help="Release vLLM memory while training: 0 no, 1 weights offloaded "
                                              "and KV cache dropped, 2 both dropped.")
    offload_model: bool = arg(False, help="Offload the training weights to CPU while vLLM generates.")
    offload_optimizer: bool = arg(False, help="Offload the optimizer state to CPU while vLLM generates.")
    lmbda: float = arg(0.5, ge=0.0, le=1.0, help="GKD: fraction of student-generated data.")
    sft_alpha: float = arg(0.0, ge=0.0, help="GKD: weight of the added SFT loss.")
    seq_kd: bool = arg(False, help="GKD: sequence-level distillation.")


@dataclass
class ExportArguments:
    to_mcore: bool = arg(False, help="Convert Hugging Face weights (--model) to an mcore checkpoint.")
    to_hf: bool = arg(False, help="Convert an mcore checkpoint (--mcore_model) to Hugging Face weights.")
    test_convert_precision: bool = arg(False, help="Compare HF and mcore logits after converting.")
    merge_lora: bool = arg(False, help="Merge LoRA adapters into the base weights.")
    mcore_model: Optional[str] = arg(None, help="mcore checkpoint directory (parent of iter_*).")
    mcore_adapters: List[str] = arg(factory=list, help="mcore LoRA checkpoints to merge or convert.")
    output_dir: Optional[str] = arg(None, help="Output directory; default: <model>-mcore or <mcore_model>-hf.")
    exist_ok: bool = arg(False, help="Allow an existing output_dir (files are overwritten).")
    thread_count: Optional[int] = arg(None, ge=1, help="Shards written with --to_mcore; default: by model size.")
    max_shard_size: str = arg("5GB", help="Largest safetensors shard, e.g. 5GB, 500MB.")
    safe_serialization: bool = arg(True, help="Write safetensors (false: torch .bin).")
    push_to_hub: bool = arg(False, help="Push the result to the hub.")
    hub_model_id: Optional[str] = arg(None, help="Hub repo to push to.")
    hub_private_repo: bool = arg(False, help="Create the hub repo as private.")
    commit_message: str = arg("update files", help="Hub commit message.")


@dataclass
class RolloutServerArguments:
    """``megatron rollout``: a vLLM generation server for ``megatron rlhf --vllm_mode server``."""
    model: Optional[str] = arg(None, help="Local Hugging Face model directory served (initial weights, tokenizer).")
    host: str = arg("127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
    port: int = arg(8000, ge=1, le=65535, help="Port to listen on.")
    seed: int = arg(42, help="Sampling seed of the engine.")
    torch_dtype: Optional[str] = arg(None, choices=DTYPES, value_aliases=DTYPE_ALIASES,
                                     help="Weight dtype; default: read from config.json.")
    vllm_max_model_len: Optional[int] = arg(None, ge=1, help="Longest prompt + completion; default: the model's "
                                                            "max_position_embeddings.")
    vllm_gpu_memory_utilization: float = arg(0.9, gt=0.0, le=1.0, help="GPU memory fraction (on CPU: a cap on the "
                                                                       "KV cache, as a fraction of free host memory).")
    vllm_tensor_parallel_size: int = arg(1, ge=1, help="vLLM tensor parallel size (1 is built).")
    vllm_enforce_eager: bool = arg(False, help="No CUDA graphs.")
    vllm_max_num_seqs: int = arg(64, ge=1, help="Sequences generated at once.")


@dataclass
class DerivedArguments:
    """Filled by validation; not settable from the command line or a config file."""
    command: str = derived("", help="The command (pt, sft, rlhf, export).")
    world_size: int = derived(1, help="Ranks in the job (WORLD_SIZE, or NPROC_PER_NODE x NNODES before relaunch).")
    data_parallel_size: int = derived(1, help="world_size / (TP x PP x CP).")
    num_micro_batches: Optional[int] = derived(None, help="Gradient accumulation steps: "
                                                          "global_batch_size / (micro_batch_size x DP).")
    hf_config: Optional[Dict] = derived(None, help="config.json of a local --model (None for hub ids).")
    model_dir: Optional[str] = derived(None, help="Absolute path of a local --model directory.")
    explicit_args: List[str] = derived(help="Names given on the command line or in the config file.", factory=list)


SECTION_TITLES = {
    BaseArguments: "Base arguments",
    ModelArguments: "Model arguments",
    DataArguments: "Data arguments",
    TemplateArguments: "Template arguments",
    ParallelArguments: "Parallelism arguments",
    MegatronArguments: "Megatron arguments",
    TunerArguments: "Tuner (LoRA / freezing) arguments",
    RLHFArguments: "RLHF arguments",
    ExportArguments: "Export arguments",
    RolloutServerArguments: "Rollout server arguments",
}
