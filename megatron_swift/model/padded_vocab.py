"""Keep megatron's padded vocabulary rows out of the softmax.

megatron pads the vocabulary to a multiple of 128 x TP (so the output layer splits evenly); the
padded rows are real parameters (zeros, or tied to zero embedding rows) whose logits megatron's
vocab-parallel cross entropy includes in its normaliser. The loss then is not the HF model's: for
a 1000-token vocabulary padded to 1024 every loss of a fresh model is log(1024/1000) = 0.024
higher, and training spends gradient pushing logits of tokens that do not exist. transformers
(and so `swift sft` and the converted model after `export --to_hf`) normalise over the real
vocabulary only.

Setting the padded logits to the dtype's lowest value makes their probability exactly 0 (so their
gradient is 0 too) while staying finite, so code that forms ``p * log p`` (entropies, KL) does not
produce NaN. A forward hook on the output layer does it on the tensor-parallel rank(s) holding the
padding, for every consumer of the logits (loss, evaluation, generation).
"""

from __future__ import annotations

import torch


def mask_padded_vocab(model, vocab_size: int, padded_vocab_size: int) -> bool:
    """Hook ``model.output_layer`` (last pipeline stage only) so that logits of padded vocabulary
    entries are the lowest value of their dtype. Returns True when a hook was installed."""
    layer = getattr(model, "output_layer", None)
    if layer is None or padded_vocab_size <= vocab_size:
        return False
    from megatron.core import parallel_state as ps

    local = padded_vocab_size // ps.get_tensor_model_parallel_world_size()
    first_padded = vocab_size - ps.get_tensor_model_parallel_rank() * local  # local column index
    if first_padded >= local:
        return False  # this rank's shard holds only real tokens

    def hook(module, args, output):
        logits, bias = output
        column = torch.arange(logits.shape[-1], device=logits.device)
        return logits.masked_fill(column >= max(first_padded, 0), torch.finfo(logits.dtype).min), bias

    layer.register_forward_hook(hook)
    return True
