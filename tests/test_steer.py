"""Reference steering hooks: the paper's prefill-only form and the additive form."""

import copy

import pytest
import torch
from transformers import DynamicCache

from unlock_export import prompts
from unlock_export.errors import UserError
from unlock_export.method.steer import additive_steering, paper_steering
from unlock_export.method.vectors import SteeringVectors


def vectors_for(lm, layers, site="layer_output", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return SteeringVectors({L: scale * torch.randn(lm.hidden_size, generator=g) for L in layers},
                           lm.n_layers, lm.hidden_size, site, lm.model.config.model_type)


def manual_llama_logits(model, ids, offsets):
    """Hand-written llama forward over the decoder layers, adding offsets[L] after layer L."""
    base = model.model
    h = base.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    rope = base.rotary_emb(h, pos)
    for i, layer in enumerate(base.layers):
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rope)
        h = h[0] if isinstance(h, tuple) else h
        if i in offsets:
            h = h + offsets[i]
    return model.lm_head(base.norm(h))


def test_additive_equals_hand_written_forward(load_tiny):
    lm = load_tiny("llama")
    ids = lm.tokenizer(["Question: Ava has 3 apples.\nAnswer:"], return_tensors="pt").input_ids
    vec = vectors_for(lm, [0, 2, 3], scale=0.5)
    plain = lm.model(ids).logits
    assert (manual_llama_logits(lm.model, ids, {}) - plain).abs().max() <= 1e-5
    with additive_steering(lm, vec, scale=2.0):
        steered = lm.model(ids).logits
    manual = manual_llama_logits(lm.model, ids, {L: 2.0 * v for L, v in vec.directions.items()})
    assert (steered - manual).abs().max() <= 1e-4
    assert (steered - plain).abs().max() > 0.1
    assert (lm.model(ids).logits - plain).abs().max() == 0  # hooks removed


def test_post_attention_site_equals_o_proj_bias(tiny_model_dir):
    """The post_attention site is what a bias on the attention output projection does."""
    from unlock_export.models.loading import load

    lm = load(str(tiny_model_dir("llama")), dtype="float32", device="cpu")
    biased = load(str(tiny_model_dir("llama")), dtype="float32", device="cpu")
    vec = vectors_for(lm, [1, 3], site="post_attention", scale=0.5)
    for L, v in vec.directions.items():
        o_proj = biased.model.model.layers[L].self_attn.o_proj
        o_proj.bias = torch.nn.Parameter(v.clone())
    ids = lm.tokenizer(["Question: Ben has 7 coins.\nAnswer:"], return_tensors="pt").input_ids
    with additive_steering(lm, vec):
        hooked = lm.model(ids).logits
    assert (hooked - biased.model(ids).logits).abs().max() <= 1e-5
    # and it is a different site from the layer output
    with additive_steering(lm, SteeringVectors(vec.directions, lm.n_layers, lm.hidden_size)):
        layer_out = lm.model(ids).logits
    assert (layer_out - hooked).abs().max() > 1e-2


def layer_outputs(lm, enc):
    """Each decoder layer's output, recorded by hooks registered after any steering hooks.
    (output_hidden_states is not used: transformers records it with hooks of its own that may
    run before ours.)"""
    seen = []
    layers = lm.arch.decoder_layers(lm.model)
    handles = [layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
               for layer in layers]
    try:
        lm.model(**enc)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_paper_form_edits_only_last_prompt_token_in_prefill(load_tiny):
    lm = load_tiny("qwen2")
    texts = prompts.apply_template("direct", prompts.builtin_arithmetic(3, seed=2))
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)  # left padded
    vec = vectors_for(lm, [1])
    plain = layer_outputs(lm, enc)
    with paper_steering(lm, vec, alpha=0.5):
        steered = layer_outputs(lm, enc)
    # layer 1: earlier positions untouched, the last one rotated toward r, its norm kept
    before, after = plain[1], steered[1]
    assert (before[:, :-1] - after[:, :-1]).abs().max() == 0
    assert ((before[:, -1] - after[:, -1]).norm(dim=-1) > 1e-3).all()
    assert torch.allclose(before[:, -1].norm(dim=-1), after[:, -1].norm(dim=-1), rtol=1e-5)
    unit = vec.directions[1] / vec.directions[1].norm()
    assert ((after[:, -1] @ unit) > (before[:, -1] @ unit)).all()
    assert (plain[0] - steered[0]).abs().max() == 0  # layers before the steered one: unchanged


def test_paper_form_on_selected_rows_leaves_the_others_unsteered(load_tiny):
    """rows=slice(1, None, 2): every second row of a batch is edited exactly as a batch of its own under
    the paper form, and the other rows are bit-identical to the unsteered model's (how the alpha check
    generates both in one batch)."""
    lm = load_tiny("qwen2")
    texts = prompts.apply_template("direct", prompts.builtin_arithmetic(3, seed=4))
    pairs = [text for text in texts for _ in (0, 1)]
    vec = vectors_for(lm, [1, 2])
    enc = lm.tokenizer(pairs, return_tensors="pt", padding=True)
    with torch.inference_mode():
        plain = lm.model(**enc).logits
        with paper_steering(lm, vec, alpha=0.5):
            steered = lm.model(**enc).logits
        with paper_steering(lm, vec, alpha=0.5, rows=slice(1, None, 2)):
            mixed = lm.model(**enc).logits
    assert torch.equal(mixed[0::2], plain[0::2])
    assert torch.allclose(mixed[1::2], steered[1::2], atol=1e-5)
    assert (mixed[1::2, -1] - plain[1::2, -1]).abs().max() > 1e-3  # the edit matters in this case


def test_paper_form_leaves_decode_steps_untouched(load_tiny):
    lm = load_tiny("llama")
    enc = lm.tokenizer(["Question: Iris has 12 shells.\nAnswer:"], return_tensors="pt")
    vec = vectors_for(lm, [0, 1, 2, 3])
    with paper_steering(lm, vec, alpha=0.5):
        cache = DynamicCache()
        out = lm.model(**enc, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([enc.attention_mask, torch.ones(1, 1, dtype=torch.long)], 1)
        saved = copy.deepcopy(cache)
        steered_step = lm.model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    cache = saved
    plain_step = lm.model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    assert torch.equal(steered_step, plain_step)
    unsteered_prefill = lm.model(**enc).logits
    assert (out.logits[:, -1] - unsteered_prefill[:, -1]).abs().max() > 1e-3


def test_paper_form_on_every_call_edits_a_last_token_run_on_its_own(load_tiny):
    """every_call=True: the prompt but its last token prefilled unsteered, then the last token run as a call
    of its own under the paper form, gives the paper form's prefill logits at that token (how the alpha
    check shares one prefill between the steered and the unsteered rows)."""
    lm = load_tiny("qwen2")
    ids = lm.tokenizer(["Question: Iris has 12 shells.\nAnswer:"], return_tensors="pt").input_ids
    vec = vectors_for(lm, [1, 2, 3], scale=3.0)
    with torch.inference_mode():
        with paper_steering(lm, vec, alpha=0.5):
            whole = lm.model(input_ids=ids).logits[:, -1]
        cache = DynamicCache()
        lm.model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        with paper_steering(lm, vec, alpha=0.5, every_call=True):
            split = lm.model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
        plain = lm.model(input_ids=ids).logits[:, -1]
    assert torch.allclose(split, whole, atol=1e-5)
    assert (whole - plain).abs().max() > 1e-3


def test_paper_form_in_generate_differs_and_hooks_are_removed(load_tiny):
    lm = load_tiny("llama")
    enc = lm.tokenizer(["Question: Dev has 4 books.\nAnswer:"], return_tensors="pt")
    vec = vectors_for(lm, [0, 1, 2, 3], scale=3.0)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    plain = lm.model.generate(**enc, **kwargs)
    with paper_steering(lm, vec, alpha=2.0):
        steered = lm.model.generate(**enc, **kwargs)
    assert not torch.equal(steered, plain)
    assert torch.equal(lm.model.generate(**enc, **kwargs), plain)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def test_paper_form_in_generate_equals_a_cacheless_reference(load_tiny):
    """generate() under the paper form = greedy decoding that recomputes the whole sequence each
    step with only the last prompt token's residual edited: decode steps must not be edited, however
    this transformers version passes its cache (past_key_values or cache) to the model."""
    lm = load_tiny("llama")
    vec = vectors_for(lm, [1, 2, 3], scale=3.0)
    alpha, steps = 2.0, 6
    layers = lm.arch.decoder_layers(lm.model)
    texts, references = ["Question: Dev has 4 books.\nAnswer:", "Question: Ann buys 12 pens and 3 more.\nAnswer:"], []
    for text in texts:
        prompt = lm.tokenizer(text)["input_ids"]
        last = len(prompt) - 1

        def edit(unit):
            def hook(module, args, output):
                hidden = (output[0] if isinstance(output, tuple) else output).clone()
                h = hidden[0, last]
                mixed = h / h.norm() + alpha * unit
                hidden[0, last] = h.norm() * mixed / mixed.norm()
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            return hook

        handles = [layers[L].register_forward_hook(edit(v / v.norm())) for L, v in vec.directions.items()]
        ids = list(prompt)
        try:
            with torch.inference_mode():
                for _ in range(steps):
                    ids.append(int(lm.model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        finally:
            for handle in handles:
                handle.remove()
        with paper_steering(lm, vec, alpha=alpha):
            generated = lm.model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                                          pad_token_id=lm.tokenizer.pad_token_id)
        assert generated[0].tolist() == ids
        plain = lm.model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                                  pad_token_id=lm.tokenizer.pad_token_id)
        assert plain[0].tolist() != ids  # the edit matters in this case
        references.append(ids[len(prompt):])
    # batched, left padded (as eval and calibrate run it): the same continuations
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    with paper_steering(lm, vec, alpha=alpha):
        batch = lm.model.generate(**enc, max_new_tokens=steps, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    assert batch[:, enc["input_ids"].shape[1]:].tolist() == references


def test_prefill_is_told_by_the_cache_under_either_name_or_by_positions():
    from unlock_export.method.steer import _is_prefill

    empty, filled = DynamicCache(), DynamicCache()
    filled.update(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), 0)
    for name in ("cache", "past_key_values"):
        assert _is_prefill({name: empty}, 5) and not _is_prefill({name: filled}, 1)
    assert _is_prefill({"position_ids": torch.arange(5)[None]}, 5)
    assert not _is_prefill({"position_ids": torch.tensor([[7]])}, 1)
    assert _is_prefill({}, 4)


def test_vectors_of_another_model_are_refused(load_tiny):
    lm = load_tiny("llama")
    vec = SteeringVectors({1: torch.ones(32)}, 4, 32)
    with pytest.raises(UserError, match="project the key for this model"):
        with additive_steering(lm, vec):
            pass
