"""Workarounds for megatron-core / torch behaviour, each gated on the versions it is needed for.

Process-wide workarounds are registered in ``WORKAROUNDS`` with the megatron-core version range
they were written against and the platforms they apply to; ``install(platform)`` applies the ones
that fit the installed versions. Object-level ones (``set_tensor_parallel_attributes``, the two
torch-Adam optimizer-load fixes) are functions the builder / checkpoint loader call, each gated on
the version (and the optimizer class) inside. Each has a test that reproduces the upstream
behaviour without the workaround (tests/test_platform.py, tests/test_checkpoint_resume.py), so a
megatron-core bump shows at once which ones can go.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_swift.cli.launch import die_with_parent

logger = logging.getLogger(__name__)


def megatron_core_version() -> tuple:
    from megatron.core import package_info

    return tuple(int(p) for p in package_info.__shortversion__.split(".")[:3])


@dataclass(frozen=True)
class Workaround:
    name: str
    why: str
    min_version: tuple  # inclusive
    max_version: tuple  # exclusive
    platforms: tuple  # device types ("cpu", "cuda") it applies to
    apply: Callable[[], None]

    def applies(self, device_type: str, version: Optional[tuple] = None) -> bool:
        version = version or megatron_core_version()
        return device_type in self.platforms and self.min_version <= version < self.max_version


# --------------------------------------------------------------------------------- workarounds

def _alltoall_split_sizes_as_lists() -> None:
    """The alltoall MoE dispatcher moves its split sizes to host memory as numpy arrays only when
    they live on CUDA (``maybe_move_tensor_to_cpu``: ``if tensor.is_cuda``); on CPU they stay
    tensors and ``all_to_all_single`` rejects them (TypeError in the binding). Turning CPU tensors
    into numpy arrays where megatron asks for numpy gives gloo what NCCL gets."""
    import torch
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _mla_without_transformer_engine() -> None:
    """``multi_latent_attention`` sets ``HAVE_TE = True`` whenever megatron's TE extension module
    imports, which it does without Transformer Engine too (``TELinear`` is then a MagicMock
    placeholder); MLA's constructor calls ``isinstance(self.linear_proj, TELinear)`` and fails
    (TypeError). Where ``TELinear`` is not a class, ``HAVE_TE`` is set to what it means."""
    from megatron.core.transformer import multi_latent_attention as mla

    if not isinstance(getattr(mla, "TELinear", None), type) and getattr(mla, "HAVE_TE", False):
        mla.HAVE_TE = False


def set_tensor_parallel_attributes(model) -> int:
    """megatron-core's local layers (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
    mark their weights ``tensor_model_parallel`` / ``partition_dim`` only inside the weight-init
    functions, so with ``perform_initialization=False`` (``--no_initialization``, the default when
    weights are loaded anyway; meta builds) the marks are missing: gradient clipping then counts each
    TP shard as a duplicate held by TP rank 0 only (a wrong grad norm and clip at TP > 1). Sets the
    marks those layers would have set; returns how many weights it marked. Needed by megatron-core
    < 0.17 (the builder calls it for every model; a test reproduces the upstream behaviour)."""
    if megatron_core_version() >= (0, 17, 0):
        return 0
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                      set_tensor_model_parallel_attributes)

    marked = 0
    for module in model.modules():
        dim = 1 if isinstance(module, RowParallelLinear) else 0
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)
            marked += 1
    return marked


def torch_adam_parts(optimizer) -> list:
    """The (distributed) optimizers of a possibly chained megatron optimizer whose inner optimizer is
    torch's Adam/AdamW (no apex / Transformer Engine FusedAdam): where the two load bugs below live,
    and what trainer/model_setup switches to torch's fused kernel."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for p in parts if isinstance(getattr(p, "optimizer", None), (torch_adam_classes()))]


def torch_adam_classes() -> tuple:
    import torch

    return torch.optim.Adam, torch.optim.AdamW


def _needs_adam_load_fixes() -> bool:
    return (0, 14, 0) <= megatron_core_version() < (0, 17, 0)


def prepare_optimizer_load(optimizer) -> list:
    """megatron-core 0.16, torch-Adam path: loading a ``fully_reshardable`` distributed-optimizer
    state copies every key of the live Adam state, including the scalar ``step`` that the checkpoint
    stores separately (and has already restored): ``KeyError: 'step'``. Each affected optimizer
    instance (not the class) gets a ``_set_main_param_and_optimizer_states`` that hides ``step`` from
    that copy. Returns the instances it patched."""
    import types

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not _needs_adam_load_fixes():
        return []
    patched = []
    for opt in torch_adam_parts(optimizer):
        if not isinstance(opt, DistributedOptimizer) or getattr(opt, "_step_tolerant", False):
            continue
        original = opt._set_main_param_and_optimizer_states  # bound

        def set_states(self, model_param, tensors, _original=original):
            if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                return _original(model_param, tensors)
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            step = state.pop("step", None)
            try:
                return _original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = types.MethodType(set_states, opt)
        opt._step_tolerant = True
        patched.append(opt)
    return patched


def finish_optimizer_load(optimizer) -> int:
    """megatron-core 0.16, torch-Adam path: the loaded state puts ONE ``step`` tensor into every
    parameter's state; torch's Adam increments each parameter's step in place, so a shared tensor
    advances once per parameter per iteration and bias correction drifts after a resume. Gives each
    parameter its own copy; returns how many it unshared."""
    import torch

    if not _needs_adam_load_fixes():
        return 0
    count = 0
    for opt in torch_adam_parts(optimizer):
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
                count += 1
    return count


def _die_with_parent() -> None:  # runs in the manager process (module level: spawn pickles it by name)
    die_with_parent()


_fork_state = {"installed": False, "from_main_thread": False, "parent": 0}


def _before_fork() -> None:
    import threading

    _fork_state["from_main_thread"] = threading.current_thread() is threading.main_thread()
    _fork_state["parent"] = os.getpid()


def _after_fork_in_child() -> None:
    # Linux sends PDEATHSIG when the forking *thread* ends, so only children of the main thread
    # (whose end is the trainer's end) get it; a parent already gone before prctl ran is caught by ppid.
    if _fork_state["from_main_thread"]:
        _die_with_parent()
        if os.getppid() != _fork_state["parent"]:
            os._exit(1)


def forked_children_die_with_trainer() -> bool:
    """megatron-core forks a writer process per save bucket (``FileSystemWriterAsync``) and, with
    ``--async_save``, a persistent save process; SIGKILLing the trainer mid-save (preemption, OOM
    killer) would leave them writing into a run nobody owns. An at-fork hook makes every child the
    main thread forks ask Linux to kill it with its parent. Idempotent; True when installed."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    if not _fork_state["installed"]:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _fork_state["installed"] = True
    return True


def writer_queue_dies_with_trainer() -> bool:
    """megatron-core's dist-checkpoint writer starts a ``multiprocessing`` Manager (spawned) for its
    results queue on the first save and keeps it for the process's life; when the trainer is
    SIGKILLed (preemption, OOM killer) the manager outlives it, holding memory and inherited pipes.
    Starting that queue here, from a manager whose process asks Linux to kill it when its parent
    dies, keeps megatron's code path and leaves nothing behind. Returns True when installed."""
    import multiprocessing as mp
    import sys

    if not sys.platform.startswith("linux"):
        return False
    forked_children_die_with_trainer()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "missing") is not None:
        return False  # another megatron-core layout, or already started
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_die_with_parent)
    filesystem_async._results_queue = manager.Queue()
    filesystem_async._megatron_swift_manager = manager
    return True


def thd_rope_offsets(cu_seqlens, total: int, packed_positions: bool):
    """Row ``r`` of the rotary table each packed token uses: its own index when the table has one row
    per packed token (megatron's case 1), else its position inside its sequence (case 2).
    ``repeat_interleave`` with ``output_size`` needs no host sync."""
    import torch

    index = torch.arange(total, device=cu_seqlens.device)
    if packed_positions:
        return index
    starts = cu_seqlens[:-1].long()
    return index - torch.repeat_interleave(starts, cu_seqlens[1:].long() - starts, output_size=total)


def _thd_rope_without_host_syncs() -> None:
    """megatron-core's unfused THD RoPE (``rope_utils._apply_rotary_pos_emb_thd``, the path without
    Transformer Engine's fused kernel) splits the packed row with ``cu_seqlens.tolist()`` and reads
    ``cu_seqlens[i].item()`` per sequence, in every layer, for queries and keys: host syncs inside
    the layer loop. Without context parallelism the packed rotary table is one gather of per-token
    row indices, and its cosines and sines are the same for every layer: they are computed once per
    micro batch and kept on its ``cu_seqlens`` tensor (every layer gets the same object). The
    rotation is megatron's formula (``_apply_rotary_pos_emb_bshd``: ``t * cos + rotate_half(t) *
    sin``; same numbers, tests/test_thd_attention.py). Context parallelism keeps megatron's code."""
    import torch
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils._apply_rotary_pos_emb_thd

    def cos_sin(t, cu_seqlens, freqs, mscale):
        cached = getattr(cu_seqlens, "_megatron_swift_rope", None)
        if cached is not None and cached[0] is freqs and cached[1:4] == (t.dtype, mscale, t.size(0)):
            return cached[4]
        rows = thd_rope_offsets(cu_seqlens, t.size(0), packed_positions=freqs.size(0) == t.size(0))
        table = freqs[rows]
        pair = ((torch.cos(table) * mscale).to(t.dtype), (torch.sin(table) * mscale).to(t.dtype))
        cu_seqlens._megatron_swift_rope = (freqs, t.dtype, mscale, t.size(0), pair)
        return pair

    def apply_thd(t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0,
                  cp_group=None):
        if cp_group is None or cp_group.size() != 1:
            return original(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                            multi_latent_attention=multi_latent_attention, mscale=mscale, cp_group=cp_group)
        if multi_latent_attention or freqs.size(-1) != t.size(-1):  # megatron's own split/concatenation
            rows = thd_rope_offsets(cu_seqlens, t.size(0), packed_positions=freqs.size(0) == t.size(0))
            return rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs[rows], rotary_interleaved=rotary_interleaved,
                                                         multi_latent_attention=multi_latent_attention,
                                                         mscale=mscale).squeeze(1)
        cos, sin = cos_sin(t, cu_seqlens, freqs, mscale)
        x = t.unsqueeze(1)
        return ((x * cos) + (rope_utils._rotate_half(x, rotary_interleaved) * sin)).squeeze(1)

    apply_thd._megatron_swift_original = original
    rope_utils._apply_rotary_pos_emb_thd = apply_thd


def all_gather_into_tensor_by_all_reduce(output, input_, group=None, async_op=False):
    """``all_gather_into_tensor`` as an all-reduce of a zero-padded ``output`` (exact: x + 0 = x).

    Gloo runs a collective in its own worker thread, and its all-gather copies the gathered chunks
    out with torch ops there; with more than one intra-op thread that gives every gloo thread an
    OpenMP team of its own. Once libgomp manages more threads than there are CPUs it stops spinning
    between parallel regions, so the training thread's workers sleep and are woken by a syscall for
    every op of the step: the distributed optimizer's parameter all-gather alone made a 1-process
    step 1.5x slower (0.39 s vs 0.25 s; 52,000 vs 900 voluntary context switches of the training
    thread). Gloo's all-reduce works on the buffer in place without torch ops, so nothing forks."""
    import torch.distributed as dist

    size, rank = dist.get_world_size(group), dist.get_rank(group)
    for index, chunk in enumerate(output.chunk(size)):
        if index != rank:
            chunk.zero_()
        elif chunk.data_ptr() != input_.data_ptr():  # the parameter buffer gathers into itself
            chunk.copy_(input_.view_as(chunk))
    return dist.all_reduce(output, group=group, async_op=async_op)


def _gloo_all_gather_without_thread_teams() -> None:
    """Megatron's all-gathers (the distributed optimizer's parameter gather, sequence-parallel
    activations) go through ``all_gather_into_tensor_by_all_reduce`` while the process runs more
    than one intra-op thread (one thread per rank, torchrun's default, never starts teams) and the
    group is gloo's (the shared-memory group gathers in the calling thread)."""
    import torch
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.tensor_parallel import layers, mappings, utils

    from .shm_group import SharedMemoryProcessGroup

    for module in (param_and_grad_buffer, layers, mappings, utils):
        original = module.dist_all_gather_func

        def gather(output, input_, group=None, async_op=False, _original=original):
            if torch.get_num_threads() > 1 and not isinstance(group, SharedMemoryProcessGroup):
                return all_gather_into_tensor_by_all_reduce(output, input_, group=group, async_op=async_op)
            return _original(output, input_, group=group, async_op=async_op)

        gather._megatron_swift_original = original
        module.dist_all_gather_func = gather


def _gradient_accumulation_fusion_with_torch() -> None:
    """megatron's linears take the weight-gradient GEMM into ``main_grad`` from apex's CUDA extension
    ``fused_weight_gradient_mlp_cuda`` and refuse ``gradient_accumulation_fusion`` when it does not
    import; ``kernels/wgrad.py`` has the same two functions on torch's ``addmm_``, so the fused path
    (no weight-gradient tensor, no add in DDP's hook) runs where apex cannot be installed."""
    from megatron.core.tensor_parallel import layers

    from megatron_swift.kernels import wgrad

    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = wgrad
        layers._grad_accum_fusion_available = True


def _one_rank_grad_reduce_scatter_in_place() -> None:
    """With one data-parallel rank the distributed optimizer reduce-scatters each gradient bucket
    into itself (output and input are the same memory). NCCL returns at once; gloo copies the
    bucket through a staging buffer (4-8 ms a step for 3.4 M parameters on the CPU benchmark).
    That call is skipped: a sum over one rank of a buffer into itself leaves it as it is."""
    import torch.distributed as dist
    from megatron.core.distributed import param_and_grad_buffer

    original = param_and_grad_buffer.dist_reduce_scatter_func

    def reduce_scatter(output, input_, op=dist.ReduceOp.SUM, group=None, async_op=False, _original=original):
        if (output.data_ptr() == input_.data_ptr() and output.numel() == input_.numel()
                and output.dtype == input_.dtype and dist.get_world_size(group) == 1):
            return None  # the coalescing manager and megatron's handles take None as "nothing pending"
        return _original(output, input_, op=op, group=group, async_op=async_op)

    reduce_scatter._megatron_swift_original = original
    param_and_grad_buffer.dist_reduce_scatter_func = reduce_scatter


def _multi_tensor_ops_with_foreach() -> None:
    """Without apex or Transformer Engine megatron's gradient clipping and fp32 copies fall back to
    ``local_multi_tensor_l2_norm`` (a ``torch.norm`` per parameter from Python, every norm read to
    the host to build the total) and ``local_multi_tensor_scale`` (``dst.copy_(src * scale)``: a
    temporary and a second pass per tensor). ``torch._foreach_norm`` / ``_foreach_mul_`` do the
    same per-tensor arithmetic in one call, the scale in place when source and destination are the
    same fp32 tensors (clipping main grads), and the norm stays a tensor: the same bits (test)."""
    import torch
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        norms = [norm for tensors in tensor_lists if tensors for norm in torch._foreach_norm(tensors)]
        if not norms:  # megatron's own empty case
            return torch.zeros(1, dtype=torch.float, device="cuda"), None
        if len({norm.dtype for norm in norms}) > 1:
            norms = [norm.float() for norm in norms]
        return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None

    def scale(chunk_size, noop_flag, tensor_lists, factor):
        sources, destinations = tensor_lists
        if all(src is dst and dst.dtype == torch.float32 for src, dst in zip(sources, destinations)):
            # fp32 only: the in-place foreach rounds bf16 differently from ``src * scale``
            torch._foreach_mul_(list(destinations), factor)
        else:
            torch._foreach_copy_(list(destinations), torch._foreach_mul(list(sources), factor))

    for module in (clip_grads, optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = scale
    if getattr(clip_grads, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = l2_norm


WORKAROUNDS: tuple[Workaround, ...] = (
    Workaround("alltoall_split_sizes_as_lists", _alltoall_split_sizes_as_lists.__doc__,
               (0, 14, 0), (0, 17, 0), ("cpu",), _alltoall_split_sizes_as_lists),
    Workaround("mla_without_transformer_engine", _mla_without_transformer_engine.__doc__,
               (0, 14, 0), (0, 17, 0), ("cpu", "cuda"), _mla_without_transformer_engine),
    Workaround("thd_rope_without_host_syncs", _thd_rope_without_host_syncs.__doc__,
               (0, 14, 0), (0, 17, 0), ("cpu", "cuda"), _thd_rope_without_host_syncs),
    Workaround("gloo_all_gather_without_thread_teams", _gloo_all_gather_without_thread_teams.__doc__,
               (0, 14, 0), (0, 17, 0), ("cpu",), _gloo_all_gather_without_thread_teams),
    Workaround("gradient_accumulation_fusion_with_torch", _gradient_accumulation_fusion_with_torch.__doc__,
               (0, 14, 0), (0, 17, 0), ("cpu",), _gradient_accumulation_fusion_with_torch),
    Workaround("one_rank_grad_reduce_scatter_in_place", _one_rank_grad_reduce_scatter_in_place.__doc__,
               (0, 14, 0), (0, 17, 0), ("cpu",), _one_rank_grad_reduce_scatter_in_place),
    Workaround("multi_tensor_ops_with_foreach", _multi_tensor_ops_with_foreach.__doc__,
               (0, 14, 0), (0, 17, 0), ("cpu", "cuda"), _multi_tensor_ops_with_foreach),
)

_applied: set[str] = set()


def install(device_type: str) -> list[str]:
    """Applies the workarounds for this platform and megatron-core version (idempotent)."""
    version = megatron_core_version()
    names = []
    for workaround in WORKAROUNDS:
        if workaround.name in _applied or not workaround.applies(device_type, version):
            continue
        workaround.apply()
        _applied.add(workaround.name)
        names.append(workaround.name)
    return names
