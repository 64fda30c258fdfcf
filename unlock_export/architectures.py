"""Architecture registry: everything unlock-export knows about a model family lives here.

One class per family, registered by decorator for the `model_type` values it covers (the way
llama.cpp's converter registers its model classes). The rest of the package asks the registry
where the decoder layers are and which module writes last into the residual stream; it never
branches on architecture names itself.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .errors import UserError

_REGISTRY: dict[str, type["Architecture"]] = {}


def register(*model_types: str):
    """Class decorator: make an Architecture the handler for these config `model_type`s."""

    def wrap(cls: type[Architecture]) -> type[Architecture]:
        for model_type in model_types:
            _REGISTRY[model_type] = cls
        cls.model_types = model_types
        return cls

    return wrap


class Architecture:
    """How one family lays out its decoder. Subclasses override the class attributes.

    layers_path: attribute path from the *ForCausalLM model to the decoder layer list.
    mlp_out: path inside a layer of the MLP output projection (its last residual write for a
        sequential block, so a bias there equals an offset on the layer output).
    attn_out: path inside a layer of the attention output projection (a bias there is an offset
        on the residual right after the attention block: the `post_attention` site).
    post_sublayer_norm: a norm sits between a sublayer and the residual add (Gemma 2/3, OLMo 2),
        so no bias equals a residual offset.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = "model.layers"
    mlp_out: ClassVar[str] = "mlp.down_proj"
    attn_out: ClassVar[str] = "self_attn.o_proj"
    post_sublayer_norm: ClassVar[bool] = False

    def __init__(self, model_type: str):
        self.model_type = model_type

    # -- module lookup -------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _get_path(model, self.layers_path)

    def site_module(self, model: nn.Module, layer: int, site: str) -> nn.Module:
        """The module whose *output* is added to the residual at `site` of decoder `layer`.

        `layer_output` is the decoder layer itself (its output is the residual stream after the
        layer); `post_attention` is the attention output projection.
        """
        block = self.decoder_layers(model)[layer]
        if site == "layer_output":
            return block
        if site == "post_attention":
            return _get_path(block, self.attn_out)
        raise UserError(f"unknown site '{site}': use layer_output or post_attention")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_type!r})"


@register("llama")
class LlamaArchitecture(Architecture):
    pass


@register("mistral")
class MistralArchitecture(Architecture):
    pass


@register("qwen2")
class Qwen2Architecture(Architecture):
    pass


@register("qwen3")
class Qwen3Architecture(Architecture):
    pass


@register("gemma2", "gemma3", "gemma3_text")
class GemmaArchitecture(Architecture):
    post_sublayer_norm = True


@register("olmo2")
class Olmo2Architecture(Architecture):
    post_sublayer_norm = True


@register("gpt2")
class GPT2Architecture(Architecture):
    layers_path = "transformer.h"
    mlp_out = "mlp.c_proj"
    attn_out = "attn.c_proj"


@register("gpt_neox")
class GPTNeoXArchitecture(Architecture):
    layers_path = "gpt_neox.layers"
    mlp_out = "mlp.dense_4h_to_h"
    attn_out = "attention.dense"


class GenericArchitecture(Architecture):
    """Unknown family: capture and steering still work at the layer output if the decoder layer
    list can be found (the first ModuleList as long as the layer count). Folding refuses it."""

    def __init__(self, model_type: str, layers_path: str):
        super().__init__(model_type)
        self.layers_path = layers_path

    def site_module(self, model, layer, site):
        if site != "layer_output":
            raise UserError(
                f"architecture '{self.model_type}' is not in the registry: only the layer_output "
                "site is supported for it"
            )
        return super().site_module(model, layer, site)


def registered_model_types() -> list[str]:
    return sorted(_REGISTRY)


def architecture_for(model: nn.Module) -> Architecture:
    """The registry entry for a loaded model (generic fallback for unknown families)."""
    model_type = getattr(model.config, "model_type", "unknown")
    cls = _REGISTRY.get(model_type)
    if cls is not None:
        return cls(model_type)
    n_layers = _layer_count(model.config)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return GenericArchitecture(model_type, name)
    raise UserError(
        f"cannot find the decoder layers of a '{model_type}' model; supported families: "
        + ", ".join(registered_model_types())
    )


def _layer_count(config) -> int | None:
    config = getattr(config, "text_config", None) or config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def layer_output_tensor(output) -> torch.Tensor:
    """Decoder layers return a tensor (transformers 5) or a tuple whose first item is it."""
    return output[0] if isinstance(output, tuple) else output


def replace_layer_output(output, hidden: torch.Tensor):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
