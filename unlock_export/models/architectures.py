"""Architecture registry: everything unlock-export knows about a model family lives here.

One class per family, registered by decorator for the `model_type` values it covers (the way
llama.cpp's converter registers its model classes). The rest of the package asks the registry
where the decoder layers are and which module writes last into the residual stream; it never
branches on architecture names itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..errors import UserError

_REGISTRY: dict[str, type["Architecture"]] = {}



@dataclass(frozen=True)
class BiasPlan:
    """How a residual offset at one site becomes ordinary bias weights in a checkpoint.

    carrier: module path inside a decoder layer whose bias carries the offset.
    native_bias: the checkpoint already has that bias (the offset is added to it).
    zero_biases: module paths inside every layer that the new config flags give a bias, which
        the checkpoint lacks: they are written as zeros (the carrier included, for unsteered layers).
    config_set / config_drop: config.json changes (a relabel to another family included).
    """

    carrier: str
    native_bias: bool = False
    zero_biases: tuple[str, ...] = ()
    config_set: dict = field(default_factory=dict)
    config_drop: tuple[str, ...] = ()


_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_AS_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
_SLIDING_KEYS = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")


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
    conv1d: the output projections are GPT-2 style Conv1D modules ([in, out] weights), not nn.Linear.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = "model.layers"
    mlp_out: ClassVar[str] = "mlp.down_proj"
    attn_out: ClassVar[str] = "self_attn.o_proj"
    post_sublayer_norm: ClassVar[bool] = False
    conv1d: ClassVar[bool] = False
    # llama.cpp: the GGUF `general.architecture` of this family, and whether llama.cpp runs it with
    # NEOX-style rope on the HF q/k row order (its llama graph expects those rows permuted instead)
    gguf_arch: ClassVar[str | None] = None
    gguf_rope_neox: ClassVar[bool] = False

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
        if site == "layer_output":
            return self.decoder_layers(model)[layer]
        return self.writer_module(model, layer, site)

    def writer_module(self, model: nn.Module, layer: int, site: str) -> nn.Module:
        """The projection whose output is decoder `layer`'s last write into the residual at `site`:
        the MLP output projection for `layer_output`, the attention output projection for
        `post_attention` (where a bias fold, or any edit of that write, goes)."""
        return _get_path(self.decoder_layers(model)[layer], self._writer_path(site))

    def _writer_path(self, site: str) -> str:
        paths = {"layer_output": self.mlp_out, "post_attention": self.attn_out}
        if site not in paths:
            raise UserError(f"unknown site '{site}': use layer_output or post_attention")
        return paths[site]

    def adapter_carrier(self, site: str) -> str:
        """The module path inside a decoder layer that an adapter adding an output bias targets for an
        offset at `site` (its last residual write), or a UserError saying why no such module exists.
        Unlike a bias fold no config flag is needed, so families without a foldable bias qualify."""
        if self.post_sublayer_norm or not self.model_types:
            self.bias_plan({}, site)  # raises the family's refusal
        return self._writer_path(site)

    # -- folding ------------------------------------------------------------------------------
    def bias_plan(self, config: dict, site: str) -> BiasPlan:
        """Where an offset at `site` can live exactly as a bias, or a UserError saying why not."""
        if self.post_sublayer_norm:
            raise UserError(
                f"cannot fold into a {self.model_type} model: a norm follows each sublayer before the residual "
                "add, so no bias equals a residual offset; use `unlock-export cvec` (llama.cpp control vector) instead"
            )
        raise UserError(
            f"cannot fold into a '{self.model_type}' model: no bias in it equals a residual offset "
            "(not in the architecture registry); use `unlock-export cvec` for llama.cpp instead"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_type!r})"


# the rope types a model relabelled as Llama computes as its own family did: transformers' Llama,
# vLLM's and llama.cpp's llama graph read them from the same config keys
LLAMA_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def _rope_types(config: dict) -> list[str]:
    """The rope types a config.json names: `rope_parameters` (transformers 5, flat or one entry per
    attention type) or the older `rope_scaling` (`rope_type`, or `type`); `default` when neither."""
    found = []
    for key in ("rope_parameters", "rope_scaling"):
        value = config.get(key)
        if not isinstance(value, dict):
            continue
        entries = [v for v in value.values() if isinstance(v, dict)] or [value]
        for entry in entries:
            found.append(str(entry.get("rope_type") or entry.get("type") or "default"))
    return found or ["default"]


def _check_llama_rope(config: dict) -> None:
    """A relabel to Llama keeps the rope settings as they are: refuse those Llama does not compute."""
    unknown = [t for t in _rope_types(config) if t not in LLAMA_ROPE_TYPES]
    if unknown:
        raise UserError(
            f"cannot fold into this {config.get('model_type', 'unknown')} model: its rope scaling "
            f"'{unknown[0]}' has no Llama equivalent (Llama computes {', '.join(LLAMA_ROPE_TYPES)}), so the "
            "relabelled checkpoint would position tokens differently; use `unlock-export cvec` for llama.cpp instead"
        )


def _llama_flag_plan(config: dict, site: str, relabel: dict | None = None, drop: tuple = (),
                     qkv_bias: bool = False) -> BiasPlan:
    """Llama-layout bias plan: `mlp_bias` puts the offset on down_proj (layer output);
    `attention_bias` puts it on o_proj (post attention). A flag gives every projection it covers a
    bias: those the checkpoint lacks are written as zeros. `qkv_bias`: the checkpoint has q/k/v
    biases (Qwen2), which only `attention_bias` keeps."""
    if relabel:
        _check_llama_rope(config)
    updates = dict(relabel or {})
    has_qkv = qkv_bias or bool(config.get("attention_bias"))
    has_o = bool(config.get("attention_bias"))
    if has_qkv:
        updates["attention_bias"] = True
    zeros: tuple[str, ...] = () if has_o or not has_qkv else ("self_attn.o_proj",)
    if site == "layer_output":
        updates["mlp_bias"] = True
        has_mlp = bool(config.get("mlp_bias"))
        return BiasPlan("mlp.down_proj", has_mlp, zeros + (() if has_mlp else _LLAMA_MLP), updates, drop)
    updates["attention_bias"] = True
    zeros = (() if has_qkv else _LLAMA_ATTN[:3]) + (() if has_o else ("self_attn.o_proj",))
    return BiasPlan("self_attn.o_proj", has_o, zeros, updates, drop)


@register("llama")
class LlamaArchitecture(Architecture):
    gguf_arch = "llama"

    def bias_plan(self, config, site):
        return _llama_flag_plan(config, site)


@register("mistral")
class MistralArchitecture(Architecture):
    """Folded by relabelling as Llama, which has the same layout, when no sliding window is active."""

    gguf_arch = "llama"  # llama.cpp converts Mistral checkpoints as llama

    def bias_plan(self, config, site):
        if config.get("sliding_window") is not None:
            raise UserError(
                f"cannot fold into this mistral model: sliding_window={config['sliding_window']} has no Llama "
                "equivalent; use `unlock-export cvec` for llama.cpp instead"
            )
        return _llama_flag_plan(config, site, _AS_LLAMA, _SLIDING_KEYS)


@register("qwen2")
class Qwen2Architecture(Architecture):
    """Qwen2 has only q/k/v biases. Relabelled as Llama with attention_bias (keeps them, adds a zero
    o_proj bias) and mlp_bias (down_proj carries the offset), when no sliding window is active."""

    gguf_arch = "qwen2"
    gguf_rope_neox = True

    def bias_plan(self, config, site):
        if config.get("use_sliding_window"):
            raise UserError(
                "cannot fold into this qwen2 model: use_sliding_window is on, which Llama cannot express; "
                "use `unlock-export cvec` for llama.cpp instead"
            )
        return _llama_flag_plan(config, site, _AS_LLAMA, _SLIDING_KEYS, qkv_bias=True)


@register("qwen3")
class Qwen3Architecture(Architecture):
    gguf_arch = "qwen3"
    gguf_rope_neox = True

    def bias_plan(self, config, site):
        if site == "layer_output":
            raise UserError(
                "qwen3 has no bias that is a layer's last residual write, so layer_output vectors cannot be "
                "folded exactly; project with --site post_attention (o_proj bias, transformers only) or use "
                "`unlock-export cvec` for llama.cpp"
            )
        return _llama_flag_plan(config, site)


class _PostNormArchitecture(Architecture):
    post_sublayer_norm = True  # Architecture.bias_plan refuses it


@register("gemma2")
class Gemma2Architecture(_PostNormArchitecture):
    gguf_arch = "gemma2"


@register("gemma3", "gemma3_text")
class Gemma3Architecture(_PostNormArchitecture):
    gguf_arch = "gemma3"


@register("olmo2")
class Olmo2Architecture(_PostNormArchitecture):
    gguf_arch = "olmo2"


class _NativeBiasArchitecture(Architecture):
    """Families whose output projections already carry biases: the offset is added to them."""

    def bias_plan(self, config, site):
        return BiasPlan(self.mlp_out if site == "layer_output" else self.attn_out, native_bias=True)


@register("gpt2")
class GPT2Architecture(_NativeBiasArchitecture):
    layers_path = "transformer.h"
    gguf_arch = "gpt2"
    conv1d = True
    mlp_out = "mlp.c_proj"
    attn_out = "attn.c_proj"


@register("gpt_neox")
class GPTNeoXArchitecture(_NativeBiasArchitecture):
    """Parallel or sequential residual: the MLP output bias is an offset on the layer output either way."""

    layers_path = "gpt_neox.layers"
    gguf_arch = "gptneox"
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

    def writer_module(self, model, layer, site):
        raise UserError(f"architecture '{self.model_type}' is not in the registry: where its layers write "
                        "into the residual stream is unknown")


def architecture_for_config(config: dict) -> Architecture:
    """The registry entry for a config.json (no model loaded); unknown families get the base class,
    which refuses to fold."""
    model_type = config.get("model_type", "unknown")
    cls = _REGISTRY.get(model_type, Architecture)
    return cls(model_type)


def registered_model_types() -> list[str]:
    return sorted(_REGISTRY)


def architecture_for(model: nn.Module) -> Architecture:
    """The registry entry for a loaded model (generic fallback for unknown families)."""
    model_type = getattr(model.config, "model_type", "unknown")
    cls = _REGISTRY.get(model_type)
    if cls is not None:
        return cls(model_type)
    n_layers = config_size(model.config, "layers")
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return GenericArchitecture(model_type, name)
    raise UserError(
        f"cannot find the decoder layers of a '{model_type}' model; supported families: "
        + ", ".join(registered_model_types())
    )


_SIZE_KEYS = {"layers": ("num_hidden_layers", "n_layer", "num_layers"),
              "hidden": ("hidden_size", "n_embd", "d_model")}


def config_size(config, kind: str) -> int | None:
    """Decoder layer count (kind 'layers') or hidden size ('hidden') from a config object or a
    config.json dict, under whichever name the family uses (text_config first for multimodal)."""
    get = (lambda c, k: c.get(k)) if isinstance(config, dict) else (lambda c, k: getattr(c, k, None))
    config = get(config, "text_config") or config
    for name in _SIZE_KEYS[kind]:
        value = get(config, name)
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
