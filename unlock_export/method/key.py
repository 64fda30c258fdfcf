"""Master Key: the per-layer direction that separates capability-present from capability-absent."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import atomic_save, read_safetensors
from ..choices import METHODS
from ..errors import UserError

FORMAT = "unlock-export/master-key"


def aggregate_differences(locked: torch.Tensor, unlocked: torch.Tensor, method: str = "mean") -> torch.Tensor:
    """Aggregate per-prompt differences [layers, N, d] into one vector per layer [layers, d].

    mean: the average difference, not normalised (the paper's mean form).
    pca: the first principal direction of the centred differences, signed to agree with the mean
         difference and scaled by the mean difference's length along it, so both methods give
         vectors of comparable size.
    """
    if locked.shape != unlocked.shape:
        raise UserError(f"locked and unlocked activations differ in shape: {tuple(locked.shape)} vs {tuple(unlocked.shape)}")
    diffs = unlocked.float() - locked.float()
    mean = diffs.mean(dim=1)
    if method == "mean":
        return mean
    if method == "pca":
        if diffs.shape[1] < 2:
            raise UserError("the pca key needs at least 2 prompt pairs; use --method mean or more prompts")
        centred = diffs - mean[:, None, :]
        _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
        direction = vh[:, 0, :].float()  # [layers, d], unit norm
        along = (direction * mean).sum(dim=1, keepdim=True)
        # sign fix toward the mean difference; magnitude = |projection of the mean| (never zero)
        sign = torch.where(along >= 0, 1.0, -1.0)
        return direction * sign * along.abs().clamp_min(1e-12)
    raise UserError(f"unknown key method '{method}': use {' or '.join(METHODS)}")


@dataclass
class MasterKey:
    vectors: torch.Tensor  # [source_layers, source_hidden], float32
    provenance: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        meta = {"format": FORMAT, "layer_count": self.vectors.shape[0], "hidden_size": self.vectors.shape[1]}
        return atomic_save({"key": self.vectors.float()}, path, {**self.provenance, **meta})

    @classmethod
    def load(cls, path: str | Path) -> "MasterKey":
        tensors, meta = read_safetensors(path, "master key", FORMAT)
        if "key" not in tensors or tensors["key"].dim() != 2:
            raise UserError(f"master key file '{path}' has no 2-D 'key' tensor; recompute it with `unlock-export key`")
        provenance = {k: v for k, v in meta.items() if k not in ("format", "layer_count", "hidden_size")}
        return cls(tensors["key"].float(), provenance)
