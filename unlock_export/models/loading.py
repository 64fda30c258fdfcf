"""Model loading, in one place: zoo names, local directories, GGUF files and Hub ids."""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError, first_line
from . import zoo
from .architectures import Architecture, architecture_for, config_size


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points. `kind` is 'dir', 'gguf', 'hub', or 'loaded' (a model the caller loaded,
    whose files are unknown)."""

    spec: str
    kind: str
    path: str  # directory for 'dir', the directory holding the file for 'gguf', the id for 'hub'
    gguf_file: str | None = None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    arch: Architecture

    @property
    def n_layers(self) -> int:
        return len(self.arch.decoder_layers(self.model))

    @property
    def hidden_size(self) -> int:
        return int(config_size(self.model.config, "hidden"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def pickle_only(directory: str | Path) -> bool:
    """True when a model directory's weights exist only as pickles (no safetensors)."""
    directory = Path(directory)
    if any(directory.glob("*.safetensors")):
        return False
    return any(p.suffix in PICKLE_SUFFIXES for p in directory.iterdir() if p.is_file())


def check_weights(source: ModelSource, allow_pickle: bool = False) -> None:
    """Refuse what should not be loaded, before anything is loaded or written: pickled weights
    (they can run code) unless allowed, and truncated, corrupted or missing safetensors shards."""
    if source.kind != "dir":
        return
    if pickle_only(source.path):
        if not allow_pickle:
            raise UserError(
                f"model directory '{source.spec}' holds only pickled .bin weights, which can run code when "
                "loaded: convert it to safetensors, or pass --allow-pickle (loaded with torch weights_only=True)"
            )
        return
    from .checkpoint import Checkpoint

    Checkpoint(source.path)  # parses every shard header; refuses truncated or missing shards


def resolve(spec: str, fetch_zoo: bool = True) -> ModelSource:
    """Turn a user's model spec into a ModelSource, fetching zoo models on first use."""
    spec = str(spec)
    if spec.startswith(zoo.ZOO_PREFIX) or (spec in zoo.ZOO and not os.path.exists(spec)):
        entry = zoo.lookup(spec)
        path = zoo.fetch(entry.name) if fetch_zoo else zoo.model_path(entry)
        return ModelSource(spec, "gguf", str(path.parent), path.name)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"model file '{spec}' is not a .gguf file: pass a model directory or a GGUF file")
        return ModelSource(spec, "gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory '{spec}' has no config.json: pass a Hugging Face model directory")
        return ModelSource(spec, "dir", str(path))
    looks_like_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and " " not in spec
    if not looks_like_id:
        raise UserError(
            f"model '{spec}' not found: pass a local directory, a .gguf file, a zoo name "
            "(`unlock-export zoo list`) or a Hub id like org/name"
        )
    return ModelSource(spec, "hub", spec)


def gguf_architecture(path: str | Path) -> str:
    """general.architecture of a GGUF file, read from its header without loading tensors."""
    from .gguf_fields import read_fields

    arch = read_fields(path, {"general.architecture"}, complete=True).get("general.architecture")
    if not arch:
        raise UserError(f"'{path}' is not a readable GGUF file (no general.architecture); check the file or "
                        "fetch it again")
    return arch


def _check_gguf_supported(source: ModelSource) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(Path(source.path) / source.gguf_file)
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in supported:
        raise UserError(
            f"GGUF '{source.spec}' has architecture '{arch}', which transformers cannot load from GGUF "
            f"(supported: {', '.join(supported)}); convert it to a safetensors directory instead"
        )


def checkpoint_source(source: ModelSource) -> ModelSource:
    """Where a model's checkpoint files are: a GGUF's dequantized copy (models.dequantized: built once,
    then reused by every stage and run), or the source itself."""
    if source.kind != "gguf":
        return source
    from .dequantized import checkpoint_for

    _check_gguf_supported(source)
    return ModelSource(source.spec, "dir", str(checkpoint_for(Path(source.path) / source.gguf_file)))


def choose_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N")


def choose_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    return table[dtype]


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


# special tokens that end a text in the families we load; llama.cpp ends generation at these too
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<end_of_turn>",
                      "<|end|>", "<|return|>", "</s>", "<eos>")


def _generation_eos(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return {i for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None}


def special_end_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens that end a text (END_OF_TEXT_TOKENS), and its EOS."""
    special = set(tokenizer.all_special_tokens) | {added.content for added in tokenizer.added_tokens_decoder.values()
                                                   if added.special}
    ids = {tokenizer.convert_tokens_to_ids(t) for t in END_OF_TEXT_TOKENS if t in special} | {tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


def end_of_text_ids(model, tokenizer) -> list[int]:
    """Token ids after which a generated answer is over: the generation config's EOS ids, the
    tokenizer's EOS and pad tokens, and any of the tokenizer's special tokens that ends a text
    (END_OF_TEXT_TOKENS). A generation config rebuilt from a GGUF names one EOS only: Qwen's
    `<|im_end|>`, not its `<|endoftext|>`, after which the model writes a new, unrelated text."""
    ids = _generation_eos(model) | special_end_ids(tokenizer)
    if tokenizer.pad_token_id is not None:
        ids.add(tokenizer.pad_token_id)
    return sorted(ids)


def complete_generation_eos(model, tokenizer) -> None:
    """Name every end-of-text token of the vocabulary as EOS in the model's generation config, as
    llama.cpp stops at each of them. A generation config rebuilt from a GGUF names one (Qwen:
    `<|im_end|>`) where the original checkpoint's names two (`<|im_end|>`, `<|endoftext|>`); without
    this, `generate` and the checkpoints exported from a GGUF write on past `<|endoftext|>`."""
    ids = sorted(_generation_eos(model) | special_end_ids(tokenizer))
    if ids:
        model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids


def ensure_pad_token(tokenizer) -> None:
    """Batching needs a pad token; reuse EOS (or UNK, or add one) when the tokenizer has none."""
    if tokenizer.pad_token is not None:
        return
    for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            return
    tokenizer.add_special_tokens({"pad_token": "<pad>"})


@contextlib.contextmanager
def gguf_progress_follows_transformers():
    """transformers' GGUF dequantization calls tqdm directly, past `logging.disable_progress_bar()`
    (what --quiet sets): while loading, give it a tqdm that obeys that switch."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load(
    spec: str,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any supported spec, in eval mode."""
    source = resolve(spec)
    check_weights(source, allow_pickle)
    target_device = choose_device(device)
    kwargs = {"dtype": choose_dtype(dtype, target_device), "trust_remote_code": trust_remote_code}
    if source.kind == "dir" and pickle_only(source.path):
        kwargs.update(use_safetensors=False, weights_only=True)  # allowed above; never a full unpickle
    try:
        files = checkpoint_source(source)
        tokenizer = load_tokenizer(files, trust_remote_code)
        model = from_pretrained(files, target_device, device_map, **kwargs)
    except UserError:
        raise
    except pickle.UnpicklingError as exc:
        blocked = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "not plain tensors")
        raise UserError(f"model '{spec}': its pickled weights hold more than tensors and were not loaded "
                        f"({blocked[:200]}); do not use this file, get a safetensors copy")
    except (OSError, ValueError, KeyError) as exc:
        first = first_line(exc, 300)
        hint = (
            "the Hub is unreachable here: pass a local directory or GGUF file"
            if source.kind == "hub"
            else "check that the directory holds a complete transformers checkpoint"
        )
        raise UserError(f"cannot load model '{spec}': {first[:300]} ({hint})")
    if not device_map:
        model.to(target_device)
    model.eval()
    model.requires_grad_(False)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if source.kind == "gguf":
        complete_generation_eos(model, tokenizer)
    return LoadedModel(model, tokenizer, source, architecture_for(model))


def from_pretrained(files: ModelSource, device: torch.device, device_map: str | None = None, **kwargs):
    """AutoModelForCausalLM.from_pretrained on `files` (a folder, or a Hub id); a 16-bit safetensors
    folder asked for in float32 on the CPU is read in its own precision and widened exactly (_widen)."""
    from transformers import AutoModelForCausalLM

    if device_map:
        kwargs["device_map"] = device_map
    stored = _narrower_stored_dtype(files, kwargs["dtype"], device, device_map)
    if stored is None:
        return AutoModelForCausalLM.from_pretrained(files.path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(files.path, **{**kwargs, "dtype": stored})
    return _widen(model, kwargs["dtype"], Path(files.path))


def _narrower_stored_dtype(files: ModelSource, dtype: torch.dtype, device: torch.device,
                           device_map: str | None) -> torch.dtype | None:
    """The precision of a local safetensors checkpoint whose floating tensors are all one 16-bit dtype,
    when the model is asked for in a wider one on the CPU (bfloat16 weights loaded as float32); else None."""
    if device.type != "cpu" or device_map or files.kind != "dir" or dtype != torch.float32:
        return None
    from .checkpoint import Checkpoint

    try:
        ckpt = Checkpoint(files.path)
    except UserError:  # not a local safetensors folder: transformers' own loader says why
        return None
    floating = set().union(*(ckpt.shard_dtypes(shard) for shard in ckpt.shards))
    return floating.pop() if len(floating) == 1 and floating <= {torch.bfloat16, torch.float16} else None


def _mapped_ranges(folder: Path) -> list[tuple[int, int]]:
    """The address ranges this process has `folder`'s safetensors files memory-mapped at (Linux)."""
    if sys.platform != "linux":
        return []
    prefix, ranges = str(folder.resolve()) + os.sep, []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(prefix) and fields[5].rstrip().endswith(".safetensors"):
                ranges.append(tuple(int(x, 16) for x in fields[0].split("-")))
    return ranges


@functools.cache
def _madvise():
    import ctypes

    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _release(ranges: list[tuple[int, int]], start: int, size: int) -> None:
    """Drop from this process's memory the whole pages of [start, start + size) that lie in the file mappings
    `ranges`: clean file pages of a tensor already widened, read again from disk if ever touched."""
    import mmap

    page = mmap.PAGESIZE
    low, high = -(-start // page) * page, (start + size) // page * page
    madvise = _madvise()
    for begin, end in ranges:
        a, b = max(low, begin), min(high, end)
        if a < b:
            madvise(a, b - a, 4)  # MADV_DONTNEED


def _widen(model, dtype: torch.dtype, folder: Path):
    """`model`, loaded memory-mapped in its 16-bit precision, converted to `dtype` in place one tensor at
    a time. transformers' own conversion keeps every mapped page resident until the end (a 1.5B peaks at
    the float32 model plus the whole bfloat16 file, 10.4 GiB); dropping each tensor's mapped pages once it
    is widened keeps the peak near the float32 model alone (7.5 GiB). Widening is exact: the weights equal
    those of a direct float32 load."""
    ranges = _mapped_ranges(folder)
    with torch.no_grad():
        for param in model.parameters():
            old = param.data
            param.data = old.to(dtype)
            if ranges:
                _release(ranges, old.data_ptr(), old.nbytes)
        for module in model.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer.is_floating_point() and buffer.dtype != dtype:
                    module._buffers[name] = buffer.to(dtype)
    model.config.dtype = dtype
    return model


@contextlib.contextmanager
def applied_lora(loaded: LoadedModel, adapter: str | Path, scale: float = 1.0):
    """A plain PEFT LoRA folder applied to the model in `loaded` with stock PEFT (its layers injected,
    PEFT's scaling times `scale`), and taken out again on exit: the model is left as it was."""
    import json
    import warnings

    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    path = Path(adapter)
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"'{adapter}' is not a PEFT adapter folder (no readable adapter_config.json): pass the "
                        "folder `fold --mode gated-lora` wrote") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"'{adapter}' is a {config.get('peft_type')} adapter, not a LoRA: evaluate it with PEFT "
                        "yourself, or fold with --mode gated-lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on the base model's name
        peft_model = PeftModel.from_pretrained(loaded.model, str(path)).eval()
    if scale != 1.0:
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                for name in module.scaling:
                    module.scaling[name] *= scale
    try:
        yield  # PEFT injected its layers into loaded.model itself: generation there runs the LoRA
    finally:
        peft_model.unload()  # the LoRA layers out, the base modules back in place
