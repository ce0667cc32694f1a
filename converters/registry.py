"""Family name -> its declarative mapping (one small module per family in ``families/``)."""

from __future__ import annotations

from .families import llama, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe
from .mapping import FamilyMapping

MAPPINGS: dict[str, FamilyMapping] = {
    m.MAPPING.name: m.MAPPING for m in (llama, qwen2, qwen3, qwen2_moe, qwen3_moe, mixtral)
}


def mapping_for(family) -> FamilyMapping:
    """The mapping of a ``megatron_swift.model.families.ModelFamily`` (or its name)."""
    name = getattr(family, "name", family)
    try:
        return MAPPINGS[name]
    except KeyError:
        raise ValueError(f"no checkpoint conversion for model family {name!r}; supported: "
                         f"{', '.join(sorted(MAPPINGS))}") from None
