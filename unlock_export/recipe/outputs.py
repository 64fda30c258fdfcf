"""The arms a run's outputs give `compare`: every artifact the run wrote, each as the engine that serves
it runs it (the recipe runner records the target and its outputs in summary.json)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..evaluation.compare import Arm


def run_arms(run_dir: str | Path, paper: bool = False) -> tuple[str | None, list[Arm]]:
    """(the run's target model, or None for a run that predates its record, and one arm per artifact):
    the patched GGUF (`fold-gguf`), the control vector (`control-vector`), the LoRA GGUF (`gated-lora`),
    the folded checkpoint or adapter folder when no GGUF carries it (`fold` / `gated-lora`), and with
    `paper` the reference hooks at the fold's alpha (`paper`, slow: transformers)."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        outputs = set(summary["outputs"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"'{run_dir}' holds no run summary.json: pass the output folder of `unlock-export run`") \
            from None
    arms = []
    if "model.gguf" in outputs:
        arms.append(Arm("fold-gguf", "model", str(run_dir / "model.gguf")))
    if "control-vector.gguf" in outputs:
        arms.append(Arm("control-vector", "control-vector", str(run_dir / "control-vector.gguf")))
    model_dir = run_dir / "model"
    adapter = (model_dir / "adapter_config.json").is_file()
    if "lora.gguf" in outputs:
        arms.append(Arm("gated-lora", "lora", str(run_dir / "lora.gguf")))
    elif adapter:
        arms.append(Arm("adapter", "lora", str(model_dir)))
    if model_dir.is_dir() and not adapter and "model.gguf" not in outputs:
        arms.append(Arm("fold", "model", str(model_dir)))
    if paper:
        alpha = summary.get("paper_alpha") or 0.1
        arms.append(Arm("paper", "paper", str(run_dir / "vectors.safetensors"), float(alpha)))
    if not arms:
        raise UserError(f"the run in '{run_dir}' wrote no artifact to compare (no fold, GGUF or control vector); "
                        "add --paper to compare the reference hooks")
    return summary.get("target"), arms
