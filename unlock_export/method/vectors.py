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

`load` also reads vectors made elsewhere: a llama.cpp control-vector GGUF (llama.cpp's
cvector-generator, repeng's export_gguf, `unlock-export cvec`: `general.architecture =
controlvector`, float32 `direction.N`, added to the output of layer N), and a safetensors file of
`direction.N` tensors without this format's metadata (with a warning). Neither says the target's
layer count, so such vectors fit any model with more layers than their highest N and the same
hidden size (`for_model` checks that and takes the model's layer count); a control vector whose
`controlvector.layer_count` exceeds the model's layer count is refused.

Every reader takes float16, bfloat16 and float64 directions (converted to float32) and [1, N] or
[N, 1] tensors (read as their N values); a matrix, two tensors for one layer (`direction.1` and
`direction.01`) or a negative layer number is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
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
_RESERVED = ("format", "model_hint", "layer_count", "hidden_size", "site", "convention", "layer_count_known",
             "declared_layers")


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
    layer_count_known: bool = True  # False for vectors made elsewhere: layer_count is then a lower bound
    declared_layers: int | None = None  # made elsewhere: the layer count the file states, if any

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
        return dataclasses.replace(self, directions={k: v * scale for k, v in self.directions.items()},
                                   provenance={**self.provenance, "scale_applied": str(scale)})

    def select(self, layers: "list[int] | str | None") -> "SteeringVectors":
        """The vectors of `layers`: a list, or a spec as --layers takes it (all, A-B, 1,4,7; parse_layers);
        None keeps them all."""
        if layers is None:
            return self
        layers = parse_layers(layers, self.layer_count)
        if self.directions and not set(layers) & set(self.directions):
            held = self.layers
            raise UserError(f"the vectors file holds no vector for layers {format_layers(sorted(layers))} "
                            f"(it holds layers {format_layers(held)}): choose layers among those")
        return dataclasses.replace(self, directions={k: v for k, v in self.directions.items() if k in set(layers)},
                                   provenance=dict(self.provenance))

    def norms(self) -> dict[int, float]:
        return {k: float(v.norm()) for k, v in sorted(self.directions.items())}

    def check_fits(self, layer_count: int, hidden_size: int, what: str = "the model") -> None:
        if not self.layer_count_known:
            if self.declared_layers is not None and self.declared_layers > layer_count:
                raise UserError(f"the control vector states {self.declared_layers} layers (controlvector.layer_count) "
                                f"but {what} has {layer_count}: it was made for another model; use a control "
                                "vector made for this one")
            if hidden_size != self.hidden_size:
                raise UserError(f"the vectors have size {self.hidden_size} but {what} has hidden size {hidden_size}: "
                                "use a control vector made for this model")
            if max(self.directions, default=0) >= layer_count:
                raise UserError(f"the vectors steer layer {max(self.directions)} but {what} has layers "
                                f"0..{layer_count - 1}: use a control vector made for this model")
            return
        if layer_count != self.layer_count or hidden_size != self.hidden_size:
            raise UserError(
                f"the vectors are for {self.layer_count} layers of size {self.hidden_size}, but {what} has "
                f"{layer_count} layers of size {hidden_size}; project the key for this model"
            )

    def for_model(self, layer_count: int, hidden_size: int, what: str = "the model") -> "SteeringVectors":
        """These vectors, checked to fit a model of `layer_count` layers of `hidden_size`; vectors made
        elsewhere take the model's layer count."""
        self.check_fits(layer_count, hidden_size, what)
        return self if self.layer_count_known else dataclasses.replace(self, layer_count=layer_count,
                                                                        layer_count_known=True)

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
        if not self.layer_count_known:  # made elsewhere: layer_count is a lower bound, fixed by each model
            meta["layer_count_known"] = "false"
            if self.declared_layers is not None:
                meta["declared_layers"] = str(self.declared_layers)
        tensors = {f"direction.{k}": v.float() for k, v in sorted(self.directions.items())}
        return atomic_save(tensors, path, meta)

    @classmethod
    def load(cls, path: str | Path) -> "SteeringVectors":
        """A steering-vectors file, a llama.cpp control-vector GGUF, or bare direction.N tensors."""
        path = Path(path)
        if path.is_file() and path.read_bytes()[:4] == b"GGUF":
            return cls.from_control_vector(path)
        if path.is_file() and path.suffix == ".safetensors":
            bare = _bare_directions(path)
            if bare is not None:
                return bare
        tensors, meta = read_safetensors(path, "steering-vectors", FORMAT)
        directions = _directions(path, tensors.items(), "steering-vectors file")
        if not directions:
            raise UserError(f"steering-vectors file '{path}' holds no direction.N tensors")
        try:
            layer_count = int(meta["layer_count"])
            hidden_size = int(meta["hidden_size"])
        except (KeyError, ValueError):
            raise UserError(f"steering-vectors file '{path}' lacks layer_count/hidden_size metadata; write it with `unlock-export project`")
        provenance = {k: v for k, v in meta.items() if k not in _RESERVED}
        declared = meta.get("declared_layers", "")
        return cls(directions, layer_count, hidden_size, meta.get("site", "layer_output"),
                   meta.get("model_hint", ""), provenance, layer_count_known=meta.get("layer_count_known") != "false",
                   declared_layers=int(declared) if declared.isdigit() else None)

    @classmethod
    def from_control_vector(cls, path: str | Path) -> "SteeringVectors":
        """A llama.cpp control-vector GGUF: direction.N added to the output of layer N (the layer_output
        site). It names no hidden size or layer count of the model: `for_model` checks them."""
        import gguf

        from ..models.gguf_fields import read_fields

        fields = read_fields(path)
        if fields.get("general.architecture") != "controlvector":
            raise UserError(f"'{path}' is a GGUF of architecture '{fields.get('general.architecture')}', not a "
                            "control vector (controlvector): pass a control-vector GGUF or a vectors file")
        try:
            reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError) as exc:
            raise UserError(f"'{path}' is not a readable GGUF file ({exc}); write it again") from None
        from gguf.quants import dequantize

        def values(t):  # F32, F16, BF16 (stored as raw bytes) and quantized types, as float32
            try:
                return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
            except (NotImplementedError, ValueError) as exc:
                raise UserError(f"control vector '{path}': tensor '{t.name}' has type {t.tensor_type.name}, which "
                                f"cannot be read ({exc}); write it as float32") from None

        directions = _directions(path, ((t.name, t) for t in reader.tensors), "control vector", values)
        declared = fields.get("controlvector.layer_count")
        vectors = cls._made_elsewhere(path, directions, fields.get("controlvector.model_hint") or "",
                                      {"imported_from": f"llama.cpp control vector {Path(path).name}"})
        if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
            vectors = dataclasses.replace(vectors, declared_layers=declared)
        return vectors

    @classmethod
    def _made_elsewhere(cls, path, directions: dict, model_hint: str, provenance: dict) -> "SteeringVectors":
        if not directions:
            raise UserError(f"'{path}' holds no direction.N tensors: nothing to steer with")
        sizes = {v.numel() for v in directions.values()}
        if len(sizes) != 1:
            raise UserError(f"'{path}': its directions have different sizes {sorted(sizes)}; every direction.N "
                            "must have the model's hidden size")
        return cls(directions, max(directions) + 1, sizes.pop(), "layer_output", model_hint, provenance,
                   layer_count_known=False)


def _direction(tensor: torch.Tensor, path, name: str) -> torch.Tensor:
    """A direction as float32 [N]: other float types are converted, [1, N] and [N, 1] read as their
    N values; a matrix or a scalar is refused."""
    shape = tuple(tensor.shape)
    if not shape or sum(d != 1 for d in shape) > 1:
        raise UserError(f"'{path}': tensor '{name}' has shape {shape}, but a direction is one vector of the "
                        "model's hidden size: write each layer's direction as a 1-D tensor")
    return tensor.float().reshape(-1)


def _directions(path, named, what: str, values=lambda tensor: tensor) -> dict[int, torch.Tensor]:
    """{layer: direction} from (name, tensor) pairs named `direction.N`; anything else, a negative
    layer or two tensors for one layer (`direction.1`, `direction.01`) is refused in one line."""
    directions: dict[int, torch.Tensor] = {}
    names: dict[int, str] = {}
    for name, tensor in named:
        m = _NAME.match(name)
        if not m:
            if re.fullmatch(r"direction\.-\d+", name):
                raise UserError(f"{what} '{path}' holds '{name}', a negative layer number: layers count from 0 "
                                "(direction.0 is the first layer's output)")
            raise UserError(f"{what} '{path}' holds an unexpected tensor '{name}' (only direction.N)")
        layer = int(m.group(1))
        if layer in directions:
            raise UserError(f"{what} '{path}' holds two directions for layer {layer} ('{names[layer]}' and "
                            f"'{name}'): keep one")
        directions[layer], names[layer] = _direction(values(tensor), path, name), name
    return directions


def _bare_directions(path: Path) -> SteeringVectors | None:
    """direction.N tensors in a safetensors file without this format's metadata (another tool's vectors),
    or None when the file has the format key (read as usual) or is not such a file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            if "format" in meta:
                return None
            names = list(fh.keys())
            if not names or not all(_NAME.match(n) for n in names):
                return None
            directions = _directions(path, ((n, fh.get_tensor(n)) for n in names), "vectors file")
    except (SafetensorError, OSError, ValueError):
        return None
    logging.getLogger("unlock_export").warning(
        "%s has no steering-vectors metadata: read as direction.N added to the output of layer N", path)
    vectors = SteeringVectors._made_elsewhere(path, directions, meta.get("model_hint", ""),
                                              {"imported_from": f"bare direction.N tensors {path.name}"})
    if meta.get("layer_count", "").isdigit():
        count = int(meta["layer_count"])
        if count > max(directions):
            return dataclasses.replace(vectors, layer_count=count, layer_count_known=True)
    return vectors
