"""Tiny random models of every registered family, saved as ordinary HF directories with a real
(BPE, trained here offline with `tokenizers`) tokenizer, so every stage runs in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# under pytest-xdist (make test's -n auto) the workers share the cores: torch's threads are split among them,
# and the commands tests start as subprocesses get the same share
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

from unlock_export import prompts  # noqa: E402

HIDDEN = 64
LAYERS = 4


def _corpus() -> list[str]:
    qs = prompts.builtin_arithmetic(400, seed=1)
    return [t for q in qs for t in (prompts.apply_template("direct", [q])[0], prompts.apply_template("cot", [q])[0])]


def build_tokenizer(with_pad: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>"] + (["<pad>"] if with_pad else [])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    kwargs = dict(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if with_pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(**kwargs)


def tiny_config(arch: str, vocab: int, hidden: int = HIDDEN, layers: int = LAYERS, **overrides):
    import transformers as tf

    heads = max(hidden // 16, 1)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, use_sliding_window=False)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=16, use_sliding_window=False)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=64)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                            bos_token_id=1, eos_token_id=2)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, intermediate_size=2 * hidden,
                               max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny_model(arch: str, out: Path, seed: int = 0, hidden: int = HIDDEN, layers: int = LAYERS,
                     with_pad: bool = True, tokenizer=None, **overrides) -> Path:
    """A tiny random model saved with `tokenizer` (default: the small BPE one trained here)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(with_pad)
    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer), hidden, layers, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    # larger-than-default init so activations differ clearly between prompts
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox", "gemma3"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(arch, **kw) -> path of a saved tiny model (cached per arguments)."""
    cache: dict = {}

    def make(arch: str = "llama", **kwargs) -> Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in cache:
            name = arch + "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
            cache[key] = build_tiny_model(arch, tmp_path_factory.mktemp(name), **kwargs)
        return cache[key]

    return make


@pytest.fixture
def load_tiny(tiny_model_dir):
    from unlock_export.models.loading import load

    def make(arch: str = "llama", **kwargs):
        return load(str(tiny_model_dir(arch, **kwargs)), dtype="float32", device="cpu")

    return make


@pytest.fixture
def questions():
    return prompts.builtin_arithmetic(24, seed=3)


# -- engine tests: tiny models with a real tokenizer that llama.cpp's converter recognizes ------------
SERVED_TEXTS = ["Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:",
                "The capital of France is"]


def _zoo_tokenizer(name: str):
    from transformers import AutoTokenizer

    from unlock_export.models.loading import resolve

    source = resolve(f"zoo:{name}")
    return AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)


@pytest.fixture(scope="session")
def served_tiny(tmp_path_factory):
    """served_tiny(arch) -> dict(dir, tokenizer, vectors, ids): a tiny model with head size 32
    (vLLM's minimum) and a real tokenizer llama.cpp's converter recognizes (Qwen2.5's for the qwen
    families, whose tokenizer class re-derives Qwen's pre-tokenizer; SmolLM2's for the others, both
    read from the zoo GGUFs), vectors on layers 1-3 (llama.cpp never steers layer 0), and the token
    ids of SERVED_TEXTS."""
    cache: dict = {}
    tokenizers: dict = {}

    def make(arch: str) -> dict:
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"served-{arch}")
            extra = {"head_dim": 32}  # 64 / 2 heads; set explicitly, configs derive it at construction
            if arch == "gemma3":  # llama.cpp scales gemma3 attention by 1/sqrt(head_dim)
                extra["query_pre_attn_scalar"] = 32
            zoo_name = "qwen2.5-coder-0.5b-instruct" if arch.startswith("qwen") else "smollm2-135m-instruct"
            if zoo_name not in tokenizers:
                tokenizers[zoo_name] = _zoo_tokenizer(zoo_name)
            tokenizer = tokenizers[zoo_name]
            model_dir = build_tiny_model(arch, root / "hf", tokenizer=tokenizer, hidden=64, layers=4,
                                         num_attention_heads=2, num_key_value_heads=1, **extra)
            from unlock_export.method.vectors import SteeringVectors

            generator = torch.Generator().manual_seed(7)
            vectors = SteeringVectors({layer: torch.randn(64, generator=generator) * 2.0 for layer in (1, 2, 3)},
                                      layer_count=4, hidden_size=64, model_hint=arch)
            ids = [tokenizer(t)["input_ids"] for t in SERVED_TEXTS]
            cache[arch] = {"root": root, "dir": model_dir, "tokenizer": tokenizer, "vectors": vectors, "ids": ids}
        return cache[arch]

    return make


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir):
    source = tiny_model_dir("llama")
    target = tiny_model_dir("qwen2", hidden=48, layers=3)
    recipe = {
        "name": "tiny",
        "source": {"locked": {"model": str(source), "template": "direct"},
                   "unlocked": {"model": str(source), "template": "cot"}},
        "target": {"model": str(target)},
        "prompts": {"path": "builtin:arithmetic", "key_count": 16},
        "align": {"rank": 8},
        "runtime": {"dtype": "float32", "device": "cpu", "batch_size": 4},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, recipe
