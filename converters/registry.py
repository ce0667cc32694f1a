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


def mapping_of(settings) -> FamilyMapping:
    """The mapping of a built model (``GPTSettings``): its family's, with the value head of a
    ``*ForSequenceClassification`` model (``score.weight``) in place of the LM head."""
    mapping = mapping_for(settings.family)
    if getattr(settings, "num_labels", None) is None:
        return mapping
    from megatron_swift.rlhf.reward import seq_cls_rule

    head = seq_cls_rule()
    rules = tuple(head if r.mcore == head.mcore else r for r in mapping.rules)
    return FamilyMapping(f"{mapping.name}:seq_cls", rules)
