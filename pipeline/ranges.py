"""The numbers a config field accepts, declared in its type (`lr: PositiveFloat`,
`channel_mult: list[PositiveInt]`, `Annotated[float, Range(0, 1, high_open=True)]`) and checked by
`load_config` (pipeline/config.py), which also refuses any float that is not finite. Standard
library only: model configs import it and stay pure PyTorch modules.

A check that a type cannot express (a format, a path) raises FieldError from the dataclass's
`validate()`, and the message names the field's full key as a range error does."""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, get_args, get_origin


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a config field accepts, declared in its type: `Annotated[int, Range(1)]`;
    `Range()` declares that any finite number makes sense."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `low` itself is out of range
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return "any number" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# The ranges most fields share. A field with another range spells it out: Annotated[float, Range(0, 0.5)].
PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]
Decay = Annotated[float, Range(0, 1, high_open=True)]  # of a moving average: Adam's betas, an EMA, VQ codebook statistics


def range_of(tp: Any) -> Range | None:
    """The Range a field's type (from `get_type_hints(..., include_extras=True)`) declares, if any."""
    return next((extra for extra in get_args(tp)[1:] if isinstance(extra, Range)), None) \
        if get_origin(tp) is Annotated else None


class FieldError(ValueError):
    """A config value that makes no sense, raised by `validate()` for one field: `load_config`
    names the field's dotted key and where it was set. The message reads after the key: 'must be ...'."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
