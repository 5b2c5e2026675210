"""V2 datatypes and the tensor declarations a function makes in config.yaml."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dcf.oip import DATATYPES, MAX_RANK, MAX_TENSORS


class TensorSpec(BaseModel):
    """One declared input or output: ``{name, datatype, shape}``, -1 for a variable dim."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    datatype: str
    shape: list[int] = Field(max_length=MAX_RANK)
    optional: bool = Field(False, description="an input the caller may leave out")

    @field_validator("datatype")
    @classmethod
    def _datatype(cls, v: str) -> str:
        if v not in DATATYPES:
            raise ValueError(f"unknown datatype {v!r}; V2 datatypes: {', '.join(DATATYPES)}")
        return v

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        for dim in v:
            if dim < -1:
                raise ValueError(f"dimension {dim} is not a size: use -1 for a variable one")
        return v

    def metadata(self) -> dict:
        """As V2 model metadata lists it."""
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


def unique(tensors: list[TensorSpec], kind: str) -> list[TensorSpec]:
    """``tensors``, if no two share a name and there are not too many."""
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"at most {MAX_TENSORS} {kind} may be declared")
    seen: set[str] = set()
    for tensor in tensors:
        if tensor.name in seen:
            raise ValueError(f"{kind[:-1]} {tensor.name!r} is declared twice")
        seen.add(tensor.name)
    return tensors
