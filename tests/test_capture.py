"""Hook capture equals output_hidden_states; padding, mean pooling and early exit."""

import functools

import pytest
import torch
from conftest import ARCHS

from unlock_export import prompts
from unlock_export.errors import UserError
from unlock_export.method.capture import capture


def reference_last_token(lm, texts):
    """Per-prompt, unpadded forward with output_hidden_states=True: [layers, N, d]."""
    rows = []
    for text in texts:
        enc = lm.tokenizer([text], return_tensors="pt")
        out = lm.model(**enc, output_hidden_states=True)
        rows.append(torch.stack([h[0, -1] for h in out.hidden_states[1:]]))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_matches_output_hidden_states_with_left_padding(load_tiny, questions, arch):
    lm = load_tiny(arch)
    texts = prompts.apply_template("direct", questions[:10])
    ours = capture(lm, texts, batch_size=4, progress=False)  # mixed lengths -> left padding
    ref = reference_last_token(lm, texts)
    assert ours.shape == (lm.n_layers, len(texts), lm.hidden_size)
    assert ours.dtype == torch.float32
    # transformers applies the final norm to the last entry of hidden_states; we capture the
    # raw residual after every layer, so compare all but the last layer ...
    assert (ours[:-1] - ref[:-1]).abs().max() <= 1e-5
    # ... and the last layer after applying the same final norm
    if arch not in ("gpt2", "gpt_neox"):
        final_norm = lm.model.model.norm
        assert (final_norm(ours[-1]) - ref[-1]).abs().max() <= 1e-5


def test_padding_does_not_change_rows(load_tiny, questions):
    lm = load_tiny("llama")
    texts = prompts.apply_template("cot", questions[:8])
    one_by_one = capture(lm, texts, batch_size=1, progress=False)
    batched = capture(lm, texts, batch_size=8, progress=False)
    assert (one_by_one - batched).abs().max() <= 1e-5


def test_mean_position_is_masked_mean(load_tiny, questions):
    lm = load_tiny("qwen2")
    texts = questions[:5]
    ours = capture(lm, texts, position="mean", batch_size=5, progress=False)
    for i, text in enumerate(texts):
        enc = lm.tokenizer([text], return_tensors="pt")
        hs = lm.model(**enc, output_hidden_states=True).hidden_states
        assert (ours[0, i] - hs[1][0].mean(0)).abs().max() <= 1e-5


def test_early_exit_gives_identical_rows(load_tiny, questions):
    lm = load_tiny("llama")
    texts = questions[:6]
    full = capture(lm, texts, progress=False)
    calls = []
    last = lm.arch.decoder_layers(lm.model)[-1]
    handle = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        partial = capture(lm, texts, layers=[0, 1], progress=False)
    finally:
        handle.remove()
    assert torch.equal(partial, full[:2])
    assert calls == []  # the forward pass stopped before the last layer


def test_unknown_family_uses_generic_layers(tiny_model_dir, questions):
    from unlock_export.models.architectures import GenericArchitecture, architecture_for
    from unlock_export.models.loading import load

    lm = load(str(tiny_model_dir("llama")), dtype="float32", device="cpu")
    lm.model.config.model_type = "my_new_llama"
    arch = architecture_for(lm.model)
    assert isinstance(arch, GenericArchitecture) and arch.layers_path == "model.layers"
    with pytest.raises(UserError, match="not in the registry"):
        arch.writer_module(lm.model, 0, "layer_output")


def test_writer_module_is_the_last_residual_write(load_tiny, questions):
    """A registered family's writer at `layer_output` is the MLP output projection: its output plus
    the residual after attention is the layer's output, so an edit there is an edit of the layer."""
    lm = load_tiny("llama")
    block = lm.arch.decoder_layers(lm.model)[1]
    writer = lm.arch.writer_module(lm.model, 1, "layer_output")
    assert writer is block.mlp.down_proj
    offset = torch.randn(lm.model.config.hidden_size)
    plain = capture(lm, questions[:3], progress=False)
    handle = writer.register_forward_hook(lambda module, args, output: output + offset)
    try:
        shifted = capture(lm, questions[:3], layers=[1], progress=False)
    finally:
        handle.remove()
    torch.testing.assert_close(shifted[0] - plain[1], offset.expand_as(shifted[0]), atol=1e-4, rtol=0)
    assert lm.arch.writer_module(lm.model, 1, "post_attention") is block.self_attn.o_proj
    assert lm.arch.site_module(lm.model, 1, "post_attention") is block.self_attn.o_proj
    with pytest.raises(UserError, match="unknown site"):
        lm.arch.writer_module(lm.model, 1, "embeddings")


def test_pad_token_is_added_when_missing(tiny_model_dir, questions):
    from unlock_export.models.loading import load

    lm = load(str(tiny_model_dir("llama", with_pad=False)), dtype="float32", device="cpu")
    assert lm.tokenizer.pad_token is not None
    states = capture(lm, questions[:4], batch_size=4, progress=False)
    assert torch.isfinite(states).all()


def test_batch_size_chooser_follows_free_memory(load_tiny):
    from unlock_export.method.capture import activation_bytes_per_row, choose_batch_size

    lm = load_tiny("llama")
    per_row = activation_bytes_per_row(lm.model.config, 64, 4)
    assert per_row > 0
    assert activation_bytes_per_row(lm.model.config, 128, 4) > 2 * per_row  # attention grows with length^2
    assert choose_batch_size(lm, 64, free_bytes=0) == 1  # never below one
    assert choose_batch_size(lm, 64, free_bytes=2 * 10 * per_row) == 10  # half the free memory
    assert choose_batch_size(lm, 64, free_bytes=2 * 10 * per_row + per_row) == 10
    assert choose_batch_size(lm, 64, free_bytes=10**15) == 256  # capped
    sizes = [choose_batch_size(lm, 64, free_bytes=f) for f in (10**6, 10**7, 10**8, 10**9)]
    assert sizes == sorted(sizes)
    # without free_bytes it reads this machine's free memory (the same figure free_memory_bytes reports)
    from unlock_export.method.capture import free_memory_bytes

    measured = free_memory_bytes(lm.device)
    low, high = (choose_batch_size(lm, 64, free_bytes=int(measured * f)) for f in (0.9, 1.1))
    assert low <= choose_batch_size(lm, 64) <= high


def test_auto_batch_size_gives_the_same_rows(load_tiny, questions):
    lm = load_tiny("qwen2")
    texts = questions[:10]
    assert torch.allclose(capture(lm, texts, batch_size="auto", progress=False),
                          capture(lm, texts, batch_size=1, progress=False), atol=1e-5)


def test_interrupted_capture_resumes_from_its_checkpoint_with_identical_rows(load_tiny, questions, tmp_path,
                                                                          monkeypatch):
    lm = load_tiny("llama")
    texts = prompts.apply_template("direct", questions[:10])
    whole = capture(lm, texts, batch_size=3, progress=False)
    forward, calls = lm.model.forward, []

    @functools.wraps(forward)  # keeps the signature capture inspects
    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        capture(lm, texts, batch_size=3, progress=False, checkpoint_dir=tmp_path, checkpoint_every_s=3600)
    saved = list(tmp_path.glob("capture-*.safetensors"))
    assert len(saved) == 1  # saved on the interrupt even though the interval had not passed
    calls.clear()
    monkeypatch.setattr(lm.model, "forward", functools.wraps(forward)(lambda *a, **k: calls.append(1) or forward(*a, **k)))
    resumed = capture(lm, texts, batch_size=3, progress=False, checkpoint_dir=tmp_path)
    assert len(calls) == 2  # 4 batches (3, 3, 3, 1), the first two kept
    assert torch.equal(resumed, whole)
    # finished: a second call reuses every batch; other prompts or settings never reuse it
    calls.clear()
    assert torch.equal(capture(lm, texts, batch_size=3, progress=False, checkpoint_dir=tmp_path), whole)
    assert calls == []
    capture(lm, texts, batch_size=2, progress=False, checkpoint_dir=tmp_path)
    capture(lm, texts[:9], batch_size=3, progress=False, checkpoint_dir=tmp_path)
    assert len(calls) == 5 + 3
    assert len(list(tmp_path.glob("capture-*.safetensors"))) == 3


def test_unreadable_capture_checkpoint_is_ignored(load_tiny, questions, tmp_path):
    lm = load_tiny("llama")
    texts = prompts.apply_template("direct", questions[:4])
    whole = capture(lm, texts, batch_size=2, progress=False, checkpoint_dir=tmp_path)
    (saved,) = tmp_path.glob("capture-*.safetensors")
    saved.write_bytes(saved.read_bytes()[:100])  # cut off mid-write by a crash
    assert torch.equal(capture(lm, texts, batch_size=2, progress=False, checkpoint_dir=tmp_path), whole)


def test_tail_position_is_the_mean_of_each_texts_last_tokens(load_tiny, questions):
    lm = load_tiny("qwen2")
    texts = prompts.apply_template("direct", questions[:6])
    counts = [1, 2, 3, 5, 8, 500]  # 500: more than the text has, so every token
    ours = capture(lm, texts, position="tail", tail_tokens=counts, batch_size=4, progress=False)  # left padding
    for i, text in enumerate(texts):
        enc = lm.tokenizer([text], return_tensors="pt")
        hs = lm.model(**enc, output_hidden_states=True).hidden_states
        for layer in range(lm.n_layers - 1):  # the last entry of hidden_states is normed (see above)
            assert (ours[layer, i] - hs[layer + 1][0, -counts[i]:].mean(0)).abs().max() <= 1e-5
    last = capture(lm, texts, batch_size=4, progress=False)
    assert (ours[:, 0] - last[:, 0]).abs().max() <= 1e-6  # a tail of one token is the last token
    assert (ours[:, 1] - last[:, 1]).abs().max() > 1e-3


def test_tail_counts_are_checked(load_tiny, questions):
    lm = load_tiny("qwen2")
    with pytest.raises(UserError, match="tail_tokens"):
        capture(lm, questions[:2], position="tail", progress=False)
    with pytest.raises(UserError, match="tail_tokens"):
        capture(lm, questions[:2], tail_tokens=[1, 1], progress=False)
    with pytest.raises(UserError, match="one count of at least 1 per text"):
        capture(lm, questions[:2], position="tail", tail_tokens=[1, 0], progress=False)
