"""Registering FTN with PEFT.

``peft.utils.register_peft_method`` only accepts a name that already is a member of PEFT's
``PeftType`` enum, which lists PEFT's built-in methods; a method living outside PEFT has to add
its member first. :func:`peft_type` adds ``PeftType.FTN`` the way ``Enum`` makes its own
members (the member maps, the name list and the class attribute), so ``PeftType("FTN")``,
``PeftType["FTN"]``, ``PeftType.FTN`` and iteration all see it, and an ``adapter_config.json``
with ``"peft_type": "FTN"`` loads.
"""

from __future__ import annotations

from typing import Any

from peft.utils import PeftType, register_peft_method

from ..core.errors import ConfigError

__all__ = ["PEFT_NAME", "peft_type", "register"]

PEFT_NAME = "ftn"  # PEFT's name for the method; its PeftType member is the upper case


def peft_type() -> PeftType:
    """``PeftType.FTN``, added to the enum on first use."""
    name = PEFT_NAME.upper()
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # The class attribute first: Enum refuses to set an attribute that is already a member name.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register(config_cls: type, model_cls: type) -> None:
    """Register FTN with PEFT once per process (importing ftn.peft again, or reloading it, is a no-op)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    kind = peft_type()
    registered: Any = PEFT_TYPE_TO_CONFIG_MAPPING.get(kind)
    if registered is not None:
        if registered.__qualname__ != config_cls.__qualname__:
            raise ConfigError(f"another PEFT method is already registered as {PEFT_NAME!r}: {registered!r}")
        # A reloaded ftn.peft: point PEFT at the new classes.
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

        PEFT_TYPE_TO_CONFIG_MAPPING[kind] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[kind] = model_cls
        return
    register_peft_method(name=PEFT_NAME, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
