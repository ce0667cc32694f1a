"""HF <-> Megatron-Core checkpoint converters (one declarative mapping per model family)."""
