"""Low-rank alignment: a per-target-layer linear map from source space to target space.

For target layer b reading source layer s(b) = floor((S-1) b / (B-1)), with paired last-token
activations Xs [M, d_s] (source) and Xb [M, d_t] (target) of the same M prompts:
  Vs, Vb = top-k right singular vectors of Xs, Xb        (k x d_s, k x d_t)
  T_k    = pinv(Xs Vs^T) (Xb Vb^T)                          (k x k)
  T      = Vs^T T_k Vb                                      (d_s x d_t, never materialised)
The map is stored as its factors (Vs, T_k, Vb), so a key projects as ((key Vs^T) T_k) Vb.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import atomic_save, json_meta, read_safetensors
from ..errors import UserError

FORMAT = "unlock-export/low-rank-map"


def layer_map(source_layers: int, target_layers: int) -> list[int]:
    """Target layer b reads source layer floor((S-1) * b / (B-1)) (the paper's linear map)."""
    if source_layers < 1 or target_layers < 1:
        raise UserError("both models need at least one decoder layer")
    if target_layers == 1:
        return [source_layers - 1]
    return [((source_layers - 1) * b) // (target_layers - 1) for b in range(target_layers)]


def _top_right_singular(x: torch.Tensor, k: int) -> torch.Tensor:
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:k]


@dataclass
class LowRankMap:
    source_basis: torch.Tensor  # [B, k, d_s]
    core: torch.Tensor  # [B, k, k]
    target_basis: torch.Tensor  # [B, k, d_t]
    layer_map: list[int]  # source layer read by each target layer
    source_layer_count: int
    provenance: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.core.shape[1]

    @property
    def target_layer_count(self) -> int:
        return self.core.shape[0]

    @property
    def source_hidden(self) -> int:
        return self.source_basis.shape[2]

    @property
    def target_hidden(self) -> int:
        return self.target_basis.shape[2]

    def project(self, key, layers: str | list[int] | None = "all", site: str = "layer_output"):
        """The key (a MasterKey) in the target: a SteeringVectors file of the selected target `layers`
        (all, A-B, 1,4,7, or a list), added at `site` (layer_output or post_attention)."""
        from .vectors import SteeringVectors, parse_layers

        directions = self.map_key(key.vectors)
        chosen = parse_layers(layers, self.target_layer_count)
        provenance = {
            "source": key.provenance.get("unlocked_model", ""),
            "source_locked": key.provenance.get("locked_model", ""),
            "target": self.provenance.get("target_model", ""),
            "method": key.provenance.get("method", ""),
            "key_templates": f"{key.provenance.get('locked_template', '')} -> {key.provenance.get('unlocked_template', '')}",
            "n_prompts_key": key.provenance.get("n_prompts", ""),
            "key_answer_tokens": key.provenance.get("answer_tokens", "0"),
            "n_prompts_align": self.provenance.get("n_prompts", ""),
            "rank": str(self.rank),
            "layer_map": ",".join(map(str, self.layer_map)),
        }
        return SteeringVectors({b: directions[b] for b in chosen}, self.target_layer_count, self.target_hidden,
                               site, self.provenance.get("target_model_type", ""), provenance)

    def map_key(self, key: torch.Tensor) -> torch.Tensor:
        """Map a source key tensor [S, d_s] to target space [B, d_t]."""
        if key.dim() != 2 or key.shape[0] != self.source_layer_count or key.shape[1] != self.source_hidden:
            raise UserError(
                f"key shape {tuple(key.shape)} does not fit the map (source has {self.source_layer_count} "
                f"layers of size {self.source_hidden}); compute key and map from the same source model"
            )
        picked = key.float()[self.layer_map]  # [B, d_s]
        coords = torch.einsum("bd,bkd->bk", picked, self.source_basis)
        coords = torch.einsum("bk,bkj->bj", coords, self.core)
        return torch.einsum("bj,bjd->bd", coords, self.target_basis)

    def key_share(self, key: torch.Tensor) -> torch.Tensor:
        """Per target layer, the share of the source key's norm that lies inside the map's source subspace,
        |P key_s| / |key_s| with P the projection onto the rows of `source_basis` (orthonormal): what the map
        can carry at all; the rest it throws away. [B] in [0, 1]."""
        self.map_key(key)  # the same shape checks
        picked = key.float()[self.layer_map]
        coords = torch.einsum("bd,bkd->bk", picked, self.source_basis.float())
        return coords.norm(dim=-1) / picked.norm(dim=-1).clamp_min(1e-12)

    def dense_bytes(self, dtype_bytes: int = 4) -> int:
        """Size of the dense per-layer d_s x d_t maps the factors stand for."""
        return self.target_layer_count * self.source_hidden * self.target_hidden * dtype_bytes

    def factor_bytes(self, dtype_bytes: int = 4) -> int:
        return sum(t.numel() for t in (self.source_basis, self.core, self.target_basis)) * dtype_bytes

    def save(self, path: str | Path) -> Path:
        meta = {
            "format": FORMAT,
            "rank": self.rank,
            "source_layer_count": self.source_layer_count,
            "target_layer_count": self.target_layer_count,
            "source_hidden": self.source_hidden,
            "target_hidden": self.target_hidden,
            "layer_map": json_meta(self.layer_map),
        }
        tensors = {"source_basis": self.source_basis, "core": self.core, "target_basis": self.target_basis}
        return atomic_save(tensors, path, {**self.provenance, **meta})

    @classmethod
    def load(cls, path: str | Path) -> "LowRankMap":
        import json

        tensors, meta = read_safetensors(path, "map", FORMAT)
        try:
            result = cls(
                tensors["source_basis"].float(),
                tensors["core"].float(),
                tensors["target_basis"].float(),
                json.loads(meta["layer_map"]),
                int(meta["source_layer_count"]),
            )
        except (KeyError, ValueError) as exc:
            raise UserError(f"map file '{path}' is incomplete ({exc}); recompute it with `unlock-export align`")
        if not (result.source_basis.shape[0] == result.core.shape[0] == result.target_basis.shape[0]
                == len(result.layer_map)):
            raise UserError(f"map file '{path}' has inconsistent layer counts; recompute it with `unlock-export align`")
        result.provenance = {k: v for k, v in meta.items()
                             if k not in ("format", "rank", "source_layer_count", "target_layer_count",
                                          "source_hidden", "target_hidden", "layer_map")}
        return result


def fit(
    source_states: dict[int, torch.Tensor] | torch.Tensor,
    target_states: torch.Tensor,
    rank: int,
    source_layer_count: int | None = None,
    device: str | torch.device = "cpu",
    center: bool = False,
    ridge: float = 0.0,
) -> LowRankMap:
    """Fit the per-layer low-rank map.

    source_states: [S, M, d_s] for every source layer, or {source layer: [M, d_s]} holding at
        least the layers the layer map reads (pass source_layer_count then).
    target_states: [B, M, d_t].
    center: subtract each side's mean state first (the subspaces then follow the states' variation, not
        their mean; a key is a difference, so the means' offset does not enter its projection).
    ridge: least squares in the subspace with a ridge, lambda = ridge x the mean eigenvalue of Zs^T Zs
        (0: the paper's pseudo-inverse).
    """
    if rank < 1:
        raise UserError(f"rank must be at least 1, got {rank}")
    if ridge < 0:
        raise UserError(f"ridge must be >= 0, got {ridge}")
    if isinstance(source_states, torch.Tensor):
        source_layer_count = source_states.shape[0]
        source_states = {s: source_states[s] for s in range(source_layer_count)}
    if source_layer_count is None:
        raise UserError("source_layer_count is needed when source states are given per layer")
    n_target, n_prompts, d_t = target_states.shape
    mapping = layer_map(source_layer_count, n_target)
    missing = sorted(set(mapping) - set(source_states))
    if missing:
        raise UserError(f"source activations for layers {missing} are missing")
    d_s = next(iter(source_states.values())).shape[1]
    for s in set(mapping):
        if source_states[s].shape[0] != n_prompts:
            raise UserError(
                f"source and target activations pair {source_states[s].shape[0]} and {n_prompts} prompts; "
                "align on the same prompts"
            )
    k = min(rank, n_prompts, d_s, d_t)
    device = torch.device(device)
    sb, cores, tb = [], [], []
    for b, s in enumerate(mapping):
        xs = source_states[s].to(device, torch.float32)
        xb = target_states[b].to(device, torch.float32)
        if center:
            xs, xb = xs - xs.mean(0), xb - xb.mean(0)
        vs = _top_right_singular(xs, k)
        vb = _top_right_singular(xb, k)
        zs, zb = xs @ vs.T, xb @ vb.T
        if ridge:
            gram = zs.T @ zs
            lam = ridge * torch.diagonal(gram).mean()
            core = torch.linalg.solve(gram + lam * torch.eye(k, device=device), zs.T @ zb)
        else:
            core = torch.linalg.pinv(zs) @ zb
        sb.append(vs.cpu())
        cores.append(core.cpu())
        tb.append(vb.cpu())
    return LowRankMap(torch.stack(sb), torch.stack(cores), torch.stack(tb), mapping, source_layer_count,
                      {"rank_requested": str(rank), "n_prompts": str(n_prompts),
                       **({"center": "true"} if center else {}), **({"ridge": str(ridge)} if ridge else {})})


def fit_r2(lrmap: LowRankMap, source_states: dict[int, torch.Tensor], target_states: torch.Tensor) -> list[float]:
    """R^2 of predicting target activations from source activations through the map, per target layer
    (use held-out prompts). The target is compared within its own rank-k subspace."""
    scores = []
    for b, s in enumerate(lrmap.layer_map):
        xs, xb = source_states[s].float(), target_states[b].float()
        pred = ((xs @ lrmap.source_basis[b].T) @ lrmap.core[b]) @ lrmap.target_basis[b]
        truth = (xb @ lrmap.target_basis[b].T) @ lrmap.target_basis[b]
        resid = ((truth - pred) ** 2).sum()
        total = ((truth - truth.mean(0)) ** 2).sum().clamp_min(1e-12)
        scores.append(float(1 - resid / total))
    return scores
