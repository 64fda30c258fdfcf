"""The steering-vectors file: what every later stage (steer, fold, cvec, eval) reads.

A safetensors file with one float32 tensor `direction.{L}` of shape [hidden_size] per steered
layer, L being the 0-based decoder layer whose output receives the vector (llama.cpp
control-vector naming and meaning), and string metadata:

  format        "unlock-export/steering-vectors"
  model_hint    target model family (config model_type), as llama.cpp's controlvector.model_hint
  layer_count   the target's number of decoder layers
  hidden_size   the target's hidden size
  site          "layer_output" (added to the output of layer L, the default) or
                "post_attention" (added to the residual right after layer L's attention block)
  convention    how a strength applies: additive `h += scale * direction`; paper
                `h <- |h| * normalize(h/|h| + alpha * direction/|direction|)`
  ...           provenance: source, target, method, rank, n_prompts, ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import atomic_save, read_safetensors
from ..choices import SITES
from ..errors import UserError

FORMAT = "unlock-export/steering-vectors"
CONVENTION = (
    "additive: h += scale * direction; "
    "paper: h <- |h| * normalize(h/|h| + alpha * direction/|direction|) at the last prompt token in prefill"
)
_NAME = re.compile(r"^direction\.(\d+)$")
_RESERVED = ("format", "model_hint", "layer_count", "hidden_size", "site", "convention")


def parse_layers(spec: str | list[int] | None, layer_count: int) -> list[int]:
    """'all', 'A-B' (inclusive), 'A,B,C', or a mix like '2-5,9'; negative numbers count from the end."""
    if spec is None or spec == "all":
        return list(range(layer_count))
    if isinstance(spec, (list, tuple)):
        items = [str(x) for x in spec]
    else:
        items = [part.strip() for part in str(spec).split(",") if part.strip()]
    layers: set[int] = set()
    try:
        for item in items:
            m = re.fullmatch(r"(-?\d+)-(-?\d+)", item)
            if m:
                lo, hi = (_index(int(g), layer_count) for g in m.groups())
                layers.update(range(lo, hi + 1))
            else:
                layers.add(_index(int(item), layer_count))
    except ValueError:
        raise UserError(f"cannot read layers '{spec}': use all, A-B, or a comma list like 1,4,7")
    if not layers:
        raise UserError(f"layer selection '{spec}' is empty")
    return sorted(layers)


def format_layers(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'; [] -> 'none'."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts) if parts else "none"


def _index(i: int, layer_count: int) -> int:
    j = i + layer_count if i < 0 else i
    if not 0 <= j < layer_count:
        raise UserError(f"layer {i} is out of range: the model has layers 0..{layer_count - 1}")
    return j


@dataclass
class SteeringVectors:
    directions: dict[int, torch.Tensor]
    layer_count: int
    hidden_size: int
    site: str = "layer_output"
    model_hint: str = ""
    provenance: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.site not in SITES:
            raise UserError(f"unknown site '{self.site}': use {' or '.join(SITES)}")
        for layer, vec in self.directions.items():
            if not 0 <= layer < self.layer_count:
                raise UserError(f"vector for layer {layer} is out of range: the model has layers 0..{self.layer_count - 1}")
            if vec.shape != (self.hidden_size,):
                raise UserError(f"vector for layer {layer} has shape {tuple(vec.shape)}, expected ({self.hidden_size},)")
            if not torch.isfinite(vec).all():
                raise UserError(f"vector for layer {layer} contains NaN or inf; recompute the vectors")

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def scaled(self, scale: float) -> "SteeringVectors":
        return SteeringVectors({k: v * scale for k, v in self.directions.items()}, self.layer_count,
                               self.hidden_size, self.site, self.model_hint,
                               {**self.provenance, "scale_applied": str(scale)})

    def select(self, layers: list[int]) -> "SteeringVectors":
        if self.directions and not set(layers) & set(self.directions):
            held = self.layers
            raise UserError(f"the vectors file holds no vector for layers {format_layers(sorted(layers))} "
                            f"(it holds layers {format_layers(held)}): choose layers among those")
        return SteeringVectors({k: v for k, v in self.directions.items() if k in set(layers)},
                               self.layer_count, self.hidden_size, self.site, self.model_hint, dict(self.provenance))

    def norms(self) -> dict[int, float]:
        return {k: float(v.norm()) for k, v in sorted(self.directions.items())}

    def check_fits(self, layer_count: int, hidden_size: int, what: str = "the model") -> None:
        if layer_count != self.layer_count or hidden_size != self.hidden_size:
            raise UserError(
                f"the vectors are for {self.layer_count} layers of size {self.hidden_size}, but {what} has "
                f"{layer_count} layers of size {hidden_size}; project the key for this model"
            )

    def save(self, path: str | Path) -> Path:
        meta = {
            **self.provenance,
            "format": FORMAT,
            "model_hint": self.model_hint,
            "layer_count": self.layer_count,
            "hidden_size": self.hidden_size,
            "site": self.site,
            "convention": CONVENTION,
        }
        tensors = {f"direction.{k}": v.float() for k, v in sorted(self.directions.items())}
        return atomic_save(tensors, path, meta)

    @classmethod
    def load(cls, path: str | Path) -> "SteeringVectors":
        tensors, meta = read_safetensors(path, "steering-vectors", FORMAT)
        directions = {}
        for name, tensor in tensors.items():
            m = _NAME.match(name)
            if not m:
                raise UserError(f"steering-vectors file '{path}' holds an unexpected tensor '{name}' (only direction.N)")
            directions[int(m.group(1))] = tensor.float().reshape(-1)
        if not directions:
            raise UserError(f"steering-vectors file '{path}' holds no direction.N tensors")
        try:
            layer_count = int(meta["layer_count"])
            hidden_size = int(meta["hidden_size"])
        except (KeyError, ValueError):
            raise UserError(f"steering-vectors file '{path}' lacks layer_count/hidden_size metadata; write it with `unlock-export project`")
        provenance = {k: v for k, v in meta.items() if k not in _RESERVED}
        return cls(directions, layer_count, hidden_size, meta.get("site", "layer_output"),
                   meta.get("model_hint", ""), provenance)
