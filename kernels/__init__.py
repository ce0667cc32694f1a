"""Modules megatron-core's local spec lacks on CPU (SP-capable RMSNorm, THD attention), each with a reference it is tested against."""
