"""``megatron rlhf``: preference training (DPO, KTO) on Megatron-Core.

* ``logprobs``  per-token log-probs from megatron's vocab-parallel cross entropy (TP-gradient correct),
                per-sequence sums for padded and THD micro batches
* ``losses``    the DPO and KTO losses (TRL's formulas, every ``--loss_type`` honoured)
* ``reference`` the reference policy (one interface; today a frozen copy in the policy's layout)
* ``objective`` the forward step / loss hook the trainer's step runs under ``megatron rlhf``
* ``settings``  the RLHF arguments, read once and typed; builds the objective and its reference
* ``demo``      the DPO demo's data and preference measure (scripts/demo_dpo.sh)
"""
