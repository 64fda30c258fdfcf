"""Diagnostics of a transfer, per target layer, written beside each recipe output (diagnostics.json,
diagnostics.png) and summarised in the model card:

  key_norm             |key| at the source layer the target layer reads
  vector_norm          |projected key| at the target layer
  map_r2_heldout       R^2 of the low-rank map on held-out prompt pairs (not used to fit it)
  key_share_in_subspace  the share of the source key's norm inside the map's source subspace
                       (|P key| / |key|): what a rank-k map can carry at all (label-free fidelity)
  cosine_target_key    cosine between the projected key and the target's own key (the same
                       prompt contrast run on the target), when the recipe's key is a prompt
                       contrast the target can run itself (label-free fidelity)
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from ..errors import UserError
from ..method.align import LowRankMap, fit_r2
from ..method.key import MasterKey
from ..method.vectors import SteeringVectors

log = logging.getLogger(__name__)


def cosine_per_layer(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    a, b = a.float(), b.float()
    return [float(x) for x in torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)]


def transfer_diagnostics(key: MasterKey, lrmap: LowRankMap, vectors: SteeringVectors,
                         heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
                         target_key: torch.Tensor | None = None) -> dict:
    """heldout: (source states [S, N, d_s], target states [B, N, d_t]) of prompts the map never saw;
    target_key: the target's own key [B, d_t]."""
    projected = lrmap.map_key(key.vectors)
    layers = list(range(lrmap.target_layer_count))
    out = {
        "layers": layers,
        "source_layer": list(lrmap.layer_map),
        "key_norm": [round(float(key.vectors[s].norm()), 6) for s in lrmap.layer_map],
        "vector_norm": [round(float(v), 6) for v in projected.norm(dim=-1)],
        "steered_layers": vectors.layers,
        "rank": lrmap.rank,
        "key_share_in_subspace": [round(float(v), 6) for v in lrmap.key_share(key.vectors)],
        "map_r2_heldout": None,
        "heldout_prompts": None,
        "cosine_target_key": None,
    }
    if heldout is not None:
        source_states, target_states = heldout
        sources = {s: source_states[s] for s in set(lrmap.layer_map)}
        out["map_r2_heldout"] = [round(r, 6) for r in fit_r2(lrmap, sources, target_states)]
        out["heldout_prompts"] = int(target_states.shape[1])
    if target_key is not None:
        out["cosine_target_key"] = [round(c, 6) for c in cosine_per_layer(projected, target_key)]
    return out


def summary_line(diag: dict) -> str:
    """One line for the model card and the CLI."""
    parts = []
    if diag.get("map_r2_heldout"):
        r2 = diag["map_r2_heldout"]
        parts.append(f"held-out map R^2 mean {sum(r2) / len(r2):.3f} (min {min(r2):.3f})")
    if diag.get("cosine_target_key"):
        cos = [diag["cosine_target_key"][i] for i in diag["steered_layers"]] or diag["cosine_target_key"]
        parts.append(f"cosine to the target's own key mean {sum(cos) / len(cos):.3f}")
    if diag.get("key_share_in_subspace"):
        share = [diag["key_share_in_subspace"][i] for i in diag["steered_layers"]] or diag["key_share_in_subspace"]
        parts.append(f"key inside the map's subspace {min(share):.0%}..{max(share):.0%} of its norm")
    norms = diag["vector_norm"]
    parts.append(f"vector norm {min(norms):.3g}..{max(norms):.3g}")
    return "; ".join(parts)


def plots_available() -> bool:
    """True when matplotlib (the optional `plots` extra) is importable."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    if not plots_available():
        raise UserError("plots need matplotlib: pip install 'unlock-export[plots]' (or pip install matplotlib)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_diagnostics(diag: dict, path: str | Path) -> Path:
    """PNG: key and vector norms, held-out R^2, cosine to the target's own key, across depth."""
    plt = _pyplot()

    panels = [("norm", [("key (source layer read)", diag["key_norm"]), ("projected vector", diag["vector_norm"])])]
    if diag.get("map_r2_heldout"):
        panels.append(("held-out R^2", [("low-rank map", diag["map_r2_heldout"])]))
    fidelity = [("key's share inside the map's subspace", diag["key_share_in_subspace"])] \
        if diag.get("key_share_in_subspace") else []
    if diag.get("cosine_target_key"):
        fidelity.append(("cosine, projected vs target's own key", diag["cosine_target_key"]))
    if fidelity:
        panels.append(("fidelity", fidelity))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (ylabel, series) in zip(axes[:, 0], panels):
        for label, values in series:
            ax.plot(diag["layers"], values, marker="o", markersize=3, label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("target layer")
    fig.suptitle(f"transfer diagnostics (rank {diag['rank']})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_scale(points: list[dict], path: str | Path, title: str = "accuracy vs scale") -> Path:
    """PNG of accuracy (with 95% CI bars) against the steering scale; points: {scale, accuracy, ci95}."""
    plt = _pyplot()

    points = sorted(points, key=lambda p: p["scale"])
    xs = [p["scale"] for p in points]
    ys = [p["accuracy"] for p in points]
    err = [[p["accuracy"] - p["ci95"][0] for p in points], [p["ci95"][1] - p["accuracy"] for p in points]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3)
    ax.set_xlabel("scale")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(diag: dict, out_dir: Path) -> list[str]:
    """diagnostics.json always; diagnostics.png when matplotlib (the `plots` extra) is installed."""
    (Path(out_dir) / "diagnostics.json").write_text(json.dumps(diag, indent=2))
    if not plots_available():
        log.warning("diagnostics.png skipped: matplotlib is not installed (pip install 'unlock-export[plots]')")
        return ["diagnostics.json"]
    plot_diagnostics(diag, Path(out_dir) / "diagnostics.png")
    return ["diagnostics.json", "diagnostics.png"]
