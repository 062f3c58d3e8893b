"""Parameter schemas shared by methods, transforms and optimizers.

A `ParamSpec` validates one value and describes itself for the API; it is the single source
of each parameter's type, default, range and documentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from collections.abc import Mapping, Sequence
from typing import Any

from merging_core.errors import ParamError

class ParamKind(str, Enum):
    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    # A scalar, or a list with one value per adapter.
    WEIGHTS = "float_or_list"
    # One of `choices`.
    CHOICE = "choice"
    STRING = "string"
    # A JSON object (e.g. a search space), checked further by its owner's validator.
    OBJECT = "object"


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter: its type, default (or REQUIRED), range and documentation."""

    name: str
    kind: ParamKind
    doc: str
    default: Any = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def _range_text(self) -> str:
        low = "-inf" if self.minimum is None else f"{self.minimum:g}"
        high = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f"[{low}, {high}]"

    def _number(self, owner: str, value: Any, *, integer: bool) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = "an integer" if integer else "a number"
            raise ParamError(f"{owner}: parameter {self.name!r} must be {kind}, got {value!r}")
        if integer and not float(value).is_integer():
            raise ParamError(f"{owner}: parameter {self.name!r} must be an integer, got {value!r}")
        if not math.isfinite(value):
            raise ParamError(f"{owner}: parameter {self.name!r} must be finite, got {value!r}")
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            raise ParamError(
                f"{owner}: parameter {self.name!r}={value!r} is out of range; allowed "
                f"{self._range_text()}"
            )
        return int(value) if integer else float(value)

    def validate(self, owner: str, value: Any, n_adapters: int) -> Any:
        """Return the value normalised to its kind, or raise ParamError naming the parameter."""
        if self.kind is ParamKind.BOOL:
            if not isinstance(value, bool):
                raise ParamError(f"{owner}: parameter {self.name!r} must be true or false")
            return value
        if self.kind in (ParamKind.CHOICE, ParamKind.STRING):
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                allowed = f"one of {', '.join(self.choices)}" if self.choices else "a string"
                raise ParamError(f"{owner}: parameter {self.name!r} must be {allowed}, got {value!r}")
            return value
        if self.kind is ParamKind.OBJECT:
            if not isinstance(value, Mapping):
                raise ParamError(f"{owner}: parameter {self.name!r} must be an object, got {value!r}")
            return dict(value)
        if self.kind is ParamKind.INT:
            return self._number(owner, value, integer=True)
        if self.kind is ParamKind.FLOAT:
            return self._number(owner, value, integer=False)
        if isinstance(value, (list, tuple)):
            if len(value) != n_adapters:
                raise ParamError(
                    f"{owner}: parameter {self.name!r} has {len(value)} values but there are "
                    f"{n_adapters} adapters; give one value per adapter or a single number"
                )
            return [self._number(owner, v, integer=False) for v in value]
        return self._number(owner, value, integer=False)

    def describe(self) -> dict[str, Any]:
        """JSON schema-like description for the API and the docs."""
        number = {"type": "number"}
        if self.minimum is not None:
            number["minimum"] = self.minimum
        if self.maximum is not None:
            number["maximum"] = self.maximum
        schema: dict[str, Any]
        if self.kind is ParamKind.WEIGHTS:
            schema = {"anyOf": [number, {"type": "array", "items": number}]}
        elif self.kind is ParamKind.INT:
            schema = {**number, "type": "integer"}
        elif self.kind is ParamKind.BOOL:
            schema = {"type": "boolean"}
        elif self.kind in (ParamKind.CHOICE, ParamKind.STRING):
            schema = {"type": "string", **({"enum": list(self.choices)} if self.choices else {})}
        elif self.kind is ParamKind.OBJECT:
            schema = {"type": "object"}
        else:
            schema = number
        described = {"name": self.name, "kind": self.kind.value, "required": self.required}
        described |= {"doc": self.doc, "schema": schema}
        if not self.required:
            described["default"] = self.default
        return described


Params = dict[str, Any]


def validate_params(
    owner: str, specs: Sequence[ParamSpec], params: Mapping[str, Any], n_adapters: int = 1
) -> Params:
    """Validate `params` against `specs`: unknown names, missing required ones, types, ranges.

    `owner` names what the parameters belong to (e.g. "method 'ties'") in every error.
    """
    allowed = {spec.name: spec for spec in specs}
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ParamError(
            f"{owner} has no parameter {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    validated: Params = {}
    for spec in specs:
        if params.get(spec.name) is not None:
            validated[spec.name] = spec.validate(owner, params[spec.name], n_adapters)
        elif spec.required:
            raise ParamError(f"{owner} requires parameter {spec.name!r} ({spec.doc})")
        else:
            validated[spec.name] = spec.default
    return validated
