"""The models a run uses: loaded from specs one at a time, or handed in already loaded by the caller."""

from __future__ import annotations

import copy
import gc
import logging
from pathlib import Path

from ..errors import UserError
from .runtime import RuntimeOptions

log = logging.getLogger("unlock_export")


def as_loaded(model):
    """A LoadedModel from what a caller holds: a LoadedModel (as it is) or a `(model, tokenizer)` pair
    (wrapped, nothing loaded). The tokenizer is copied when it needs a pad token or left padding, so
    the caller's stays as it was."""
    from .architectures import architecture_for
    from .loading import LoadedModel, ModelSource, ensure_pad_token

    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, tuple) and len(model) == 2:
        module, tokenizer = model
        if tokenizer.pad_token is None or tokenizer.padding_side != "left":
            tokenizer = copy.deepcopy(tokenizer)
            ensure_pad_token(tokenizer)
            tokenizer.padding_side = "left"
        name = str(getattr(module, "name_or_path", "") or getattr(module.config, "_name_or_path", "") or "")
        local = Path(name)
        if name and local.is_dir() and (local / "config.json").is_file():
            source = ModelSource(name, "dir", str(local))
        elif name.endswith(".gguf") and local.is_file():
            source = ModelSource(name, "gguf", str(local.parent), local.name)
        else:
            source = ModelSource(name or "(loaded model)", "loaded", name)
        return LoadedModel(module, tokenizer, source, architecture_for(module))
    raise UserError(f"model: expected a spec string, a (model, tokenizer) pair or a LoadedModel, got "
                    f"{type(model).__name__}")


def model_label(model) -> str:
    """The name a model goes by in provenance: its spec, or the name it was loaded under."""
    return str(model) if isinstance(model, (str, Path)) else as_loaded(model).source.spec


class ModelPool:
    """Keeps the most recently loaded model, so a model used by two stages loads once, and releases
    it before loading another (one model in memory at a time). Models the caller hands in (a
    LoadedModel, or a `(model, tokenizer)` pair) are used as they are: never loaded, never released."""

    def __init__(self, options: RuntimeOptions | None = None, *, progress: bool = True,
                 checkpoint_dir: Path | None = None):
        self.options = options or RuntimeOptions()
        self.progress = progress
        self.checkpoint_dir = checkpoint_dir  # captures keep their progress here (capture.CaptureCheckpoint)
        self._spec: str | None = None
        self._loaded = None
        self._handed: dict[int, tuple] = {}  # id(object) -> (object, its LoadedModel): wrapped once

    def get(self, model):
        if not isinstance(model, (str, Path)):
            if id(model) not in self._handed:  # keep the object too, so its id stays its own
                self._handed[id(model)] = (model, as_loaded(model))
            return self._handed[id(model)][1]
        spec = str(model)
        if spec != self._spec:
            from .loading import load

            self.release()
            log.info("loading %s", spec)
            o = self.options
            self._loaded = load(spec, o.dtype, o.device, o.device_map, o.trust_remote_code, o.allow_pickle)
            self._spec = spec
        return self._loaded

    def __enter__(self) -> "ModelPool":
        return self

    def __exit__(self, *exc) -> None:
        self.release()  # a call that loaded its own models frees them before it returns

    def release(self) -> None:
        self._loaded, self._spec = None, None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
