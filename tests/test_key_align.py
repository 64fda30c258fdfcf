"""Master Key aggregation, the layer map, and the low-rank alignment."""

import pytest
import torch

from unlock_export import prompts
from unlock_export.errors import UserError
from unlock_export.method import align
from unlock_export.method.capture import capture
from unlock_export.method.key import MasterKey, aggregate_differences


def test_mean_key_is_mean_difference():
    torch.manual_seed(0)
    locked, unlocked = torch.randn(3, 10, 8), torch.randn(3, 10, 8)
    key = aggregate_differences(locked, unlocked, "mean")
    assert torch.allclose(key, (unlocked - locked).mean(1))


def test_pca_key_finds_direction_with_sign_fix():
    torch.manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    amounts = 3.0 + torch.randn(2, 50, 1)  # varying strength along one direction, positive mean
    locked = torch.randn(2, 50, 16)
    unlocked = locked + amounts * direction[:, None, :] + 0.01 * torch.randn(2, 50, 16)
    key = aggregate_differences(locked, unlocked, "pca")
    cos = torch.nn.functional.cosine_similarity(key, direction, dim=-1)
    assert (cos > 0.99).all()  # right direction and the sign of the mean difference
    mean = aggregate_differences(locked, unlocked, "mean")
    assert torch.allclose(key.norm(dim=-1), (mean * direction).sum(-1), rtol=0.05)


def test_key_errors():
    with pytest.raises(UserError, match="unknown key method"):
        aggregate_differences(torch.zeros(1, 2, 3), torch.ones(1, 2, 3), "median")
    with pytest.raises(UserError, match="differ in shape"):
        aggregate_differences(torch.zeros(1, 2, 3), torch.ones(1, 3, 3))


def test_key_file_round_trip(tmp_path):
    key = MasterKey(torch.randn(4, 8), {"method": "mean"})
    key.save(tmp_path / "k.safetensors")
    back = MasterKey.load(tmp_path / "k.safetensors")
    assert torch.equal(back.vectors, key.vectors) and back.provenance["method"] == "mean"


def test_layer_map_is_the_papers_linear_map():
    assert align.layer_map(40, 48)[0] == 0 and align.layer_map(40, 48)[-1] == 39
    assert align.layer_map(24, 28) == [(23 * b) // 27 for b in range(28)]
    assert align.layer_map(28, 24) == [(27 * b) // 23 for b in range(24)]
    assert align.layer_map(5, 5) == [0, 1, 2, 3, 4]


def test_identity_alignment_keeps_the_key(load_tiny):
    """source == target and rank >= the data's rank: the projected key equals the key."""
    lm = load_tiny("llama")
    qs = prompts.builtin_arithmetic(128, seed=5)  # 128 prompts > hidden size 64: full-rank data
    locked = capture(lm, prompts.apply_template("direct", qs), progress=False, batch_size=32)
    unlocked = capture(lm, prompts.apply_template("cot", qs), progress=False, batch_size=32)
    key = aggregate_differences(locked, unlocked)
    lrmap = align.fit(locked, locked, rank=64)
    projected = lrmap.map_key(key)
    cos = torch.nn.functional.cosine_similarity(projected, key, dim=-1)
    assert (cos > 0.99).all(), cos
    assert torch.allclose(projected.norm(dim=-1), key.norm(dim=-1), rtol=1e-2)


def test_cross_model_map_shapes_and_storage(tmp_path):
    torch.manual_seed(0)
    src, tgt = torch.randn(6, 40, 32), torch.randn(4, 40, 48)
    lrmap = align.fit(src, tgt, rank=8)
    assert lrmap.layer_map == [0, 1, 3, 5]
    assert lrmap.source_basis.shape == (4, 8, 32) and lrmap.core.shape == (4, 8, 8)
    assert lrmap.target_basis.shape == (4, 8, 48)
    assert lrmap.map_key(torch.randn(6, 32)).shape == (4, 48)
    assert lrmap.factor_bytes() < lrmap.dense_bytes()
    lrmap.save(tmp_path / "m.safetensors")
    back = align.LowRankMap.load(tmp_path / "m.safetensors")
    key = torch.randn(6, 32)
    assert torch.allclose(back.map_key(key), lrmap.map_key(key))


def test_map_recovers_a_known_linear_relation():
    """Target activations that are a linear image of the source are predicted by the map."""
    torch.manual_seed(1)
    basis = torch.randn(3, 10)  # data lives in a 3-dim subspace of the source
    xs = torch.randn(60, 3) @ basis
    w = torch.randn(10, 12)
    xb = xs @ w
    lrmap = align.fit(xs[None], xb[None], rank=3)
    assert align.fit_r2(lrmap, {0: xs}, xb[None])[0] > 0.999
    key = torch.randn(1, 3) @ basis
    assert torch.allclose(lrmap.map_key(key), key @ w, atol=1e-3 * float((key @ w).abs().max()))


def test_rank_below_one_is_refused():
    with pytest.raises(UserError, match="rank must be at least 1"):
        align.fit(torch.randn(2, 5, 4), torch.randn(2, 5, 4), rank=0)


def test_mismatched_prompt_counts_are_refused():
    with pytest.raises(UserError, match="pair"):
        align.fit(torch.randn(2, 5, 4), torch.randn(2, 6, 4), rank=2)


def _text_tail_mean(lm, prompt: str, answer: str) -> torch.Tensor:
    """Unpadded reference: residuals after each layer (but the last, which hidden_states norms),
    averaged over the last prompt token and the tokens the answer adds."""
    ids = lm.tokenizer([prompt + answer], return_tensors="pt")
    tail = len(ids["input_ids"][0]) - len(lm.tokenizer(prompt)["input_ids"]) + 1
    hs = lm.model(**ids, output_hidden_states=True).hidden_states
    return torch.stack([h[0, -tail:].mean(0) for h in hs[1:-1]])


def test_answer_token_key_reads_the_unlocked_opening_in_both_variants(tiny_model_dir):
    from unlock_export.method.pipeline import compute_key
    from unlock_export.models.pool import ModelPool
    from unlock_export.models.runtime import RuntimeOptions

    spec, k = str(tiny_model_dir("llama")), 5
    qs = prompts.builtin_arithmetic(6, seed=11)
    pool = ModelPool(RuntimeOptions(dtype="float32", device="cpu", batch_size=1), progress=False)
    key, reusable = compute_key(pool, spec, spec, "direct", "cot", qs, "mean", answer_tokens=k)
    assert reusable is None  # the map must capture the last prompt token itself
    assert key.provenance["answer_tokens"] == "5"
    lm = pool.get(spec)
    diffs = []
    for q in qs:
        cot, direct = prompts.apply_template("cot", [q])[0], prompts.apply_template("direct", [q])[0]
        enc = lm.tokenizer([cot], return_tensors="pt")
        new = lm.model.generate(**enc, max_new_tokens=k, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
        new = new[:next((i for i, t in enumerate(new) if t == lm.tokenizer.eos_token_id), len(new))] or new[:1]
        answer = lm.tokenizer.decode(new)  # the unlocked variant's own opening, read by both
        assert answer
        diffs.append(_text_tail_mean(lm, cot, answer) - _text_tail_mean(lm, direct, answer))
    reference = torch.stack(diffs).mean(0)
    assert (key.vectors[:-1] - reference).abs().max() <= 1e-4
    last, states = compute_key(pool, spec, spec, "direct", "cot", qs, "mean")  # the paper's key, as before
    assert states is not None and last.provenance["answer_tokens"] == "0"
    assert (key.vectors - last.vectors).norm() > 0.1 * last.vectors.norm()
    with pytest.raises(UserError, match="answer tokens must be 0"):
        compute_key(pool, spec, spec, "direct", "cot", qs, "mean", answer_tokens=-1)


def test_centring_ignores_a_shared_offset_and_ridge_shrinks_the_map():
    """fit(center=True) on states shifted by a constant equals the fit on the states themselves (centred);
    ridge 0 is the paper's pseudo-inverse; a ridge shrinks the core toward zero."""
    from unlock_export.method.align import fit

    g = torch.Generator().manual_seed(0)
    xs, xb = torch.randn(3, 50, 16, generator=g), torch.randn(3, 50, 12, generator=g)
    shift_s, shift_b = torch.randn(16, generator=g) * 20, torch.randn(12, generator=g) * 20
    centred = fit(xs - xs.mean(1, keepdim=True), xb - xb.mean(1, keepdim=True), 4)
    shifted = fit(xs + shift_s, xb + shift_b, 4, center=True)
    key = torch.randn(3, 16, generator=g)
    assert torch.allclose(centred.map_key(key), shifted.map_key(key), atol=1e-4)
    assert not torch.allclose(fit(xs + shift_s, xb + shift_b, 4).map_key(key), centred.map_key(key), atol=1e-2)
    plain, zero = fit(xs, xb, 4), fit(xs, xb, 4, ridge=0.0)
    assert torch.equal(plain.core, zero.core)
    ridged = fit(xs, xb, 4, ridge=1.0)
    assert torch.allclose(ridged.source_basis, plain.source_basis)
    assert float(ridged.core.norm()) < 0.9 * float(plain.core.norm())
    assert ridged.provenance["ridge"] == "1.0" and shifted.provenance["center"] == "true"
