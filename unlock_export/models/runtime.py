"""How models are loaded and run: one settings object, shared by the library, recipes and the CLI
(whose flags are generated from these fields, see cli/options.py)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

DTYPES = ("auto", "float32", "bfloat16", "float16")


class RuntimeOptions(BaseModel):
    """Loading and running models. Every field is also a CLI flag (`--batch-size`, ...) and a key of a
    recipe's `runtime:` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str = Field("auto", description="auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16.")
    device: str = Field("auto", description="auto (cuda if present), cpu, cuda, cuda:N.")
    device_map: Optional[str] = Field(None, description="accelerate placement, e.g. auto for models larger than "
                                                        "one GPU.")
    batch_size: Union[Literal["auto"], int] = Field(8, description="Prompts per forward pass, or auto (the largest "
                                                                   "that fits half the free memory).")
    max_length: Optional[int] = Field(None, ge=1, description="Truncate prompts to their last N tokens.")
    trust_remote_code: bool = Field(False, description="Allow a model's own Python code to run (off by default).")
    allow_pickle: bool = Field(False, description="Load .bin-only model folders (with torch weights_only=True); "
                                                  "refused by default.")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch(cls, value):
        if value == "auto":
            return value
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number < 1 or (isinstance(value, float) and value != number):
            raise ValueError("must be a positive integer or auto")
        return number
