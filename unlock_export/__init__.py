"""unlock-export: carry a capability from one language model into another without training (UNLOCK,
arXiv 2604.06377), and export it as files stock stacks load.

    import unlock_export as ux
    key = ux.master_key("zoo:qwen2.5-coder-0.5b-instruct", prompts="builtin:gsm8k-train", count=64)

The names below load on first use: importing the package imports no torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "master_key": "api", "fit_map": "api", "fold": "api", "write_control_vector": "api",
    "additive_steering": "method.steer", "paper_steering": "method.steer", "calibrate_scale": "api", "evaluate": "api",
    "load_model": "api", "fit_gates": "api", "steering_vectors": "api", "verify": "api", "check_alpha": "api",
    "compare_arms": "api", "record_choice": "api", "describe_artifact": "api", "push_to_hub": "api",
    "upload_text": "api", "zoo_models": "api", "fetch_zoo": "api", "write_lm_eval_config": "api",
    "write_lm_eval_task": "api", "diagnose_transfer": "api", "gated_edit": "method.gate", "GateSettings": "method.gate",
    "GateFit": "method.gate",
    "MasterKey": "method.key", "LowRankMap": "method.align", "SteeringVectors": "method.vectors",
    "FoldResult": "export.base", "Calibration": "evaluation.calibrate", "EvalSummary": "evaluation.run",
    "LoadedModel": "models.loading", "RuntimeOptions": "models.runtime",
    "UserError": "errors", "ExportFailure": "errors", "AlphaBreaksText": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unlock_export' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
