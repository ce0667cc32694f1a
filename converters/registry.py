"""Family name -> its declarative mapping (the weight rules of its registered
``megatron_swift.model.families.ModelFamily``; the built-in ones are ``families/*.py``)."""

from __future__ import annotations

from collections.abc import Mapping

from megatron_swift.model.families import families, family_by_name

from .mapping import FamilyMapping


class _Mappings(Mapping):
    """``MAPPINGS``: a live view, so a family registered later is there too."""

    def __getitem__(self, name: str) -> FamilyMapping:
        family = families().get(name)
        if family is None:
            raise KeyError(name)
        return family.mapping

    def __iter__(self):
        return iter(families())

    def __len__(self):
        return len(families())


MAPPINGS = _Mappings()


def mapping_for(family) -> FamilyMapping:
    """The mapping of a ``megatron_swift.model.families.ModelFamily`` (or its name)."""
    if hasattr(family, "mapping"):
        return family.mapping
    return family_by_name(family).mapping
