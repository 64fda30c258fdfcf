"""Keys from contrastive pairs (both row shapes), prompts through the model's chat template, and their
refusals: each key equals a computation by hand from the model's own hidden states."""

import json
from pathlib import Path

import pytest
import torch

from unlock_export.cli import main
from unlock_export.method.key import MasterKey
from unlock_export.models.loading import load

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
RUNTIME = ["--dtype", "float32", "--device", "cpu", "--batch-size", "3"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_model_dir):
    """The tiny llama with a chat template of its own (the BPE tokenizer trained in conftest has none)."""
    from transformers import AutoTokenizer

    src = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("chat-llama")
    for path in src.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


def _states(lm, text: str) -> torch.Tensor:
    """Every decoder layer's output for `text` [layers, tokens, hidden], read by plain forward hooks
    (transformers' last hidden state has the final norm applied: the residual is before it)."""
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in lm.arch.decoder_layers(lm.model)]
    enc = lm.tokenizer([text], return_tensors="pt")
    try:
        with torch.inference_mode():
            lm.model(**enc)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([o[0] for o in outputs]).float()


def _write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TEXT_PAIRS = [{"positive": "Answer: Let's think step by step. 3 plus 4", "negative": "Answer: 7"},
              {"positive": "Ben has four apples, so he", "negative": "Ben has four"},
              {"positive": "The total is twelve coins in all", "negative": "The total is 12"}]
COMPLETION_PAIRS = [{"prompt": "Question: 3 + 4?\nAnswer:", "positive": " Let's think step by step.", "negative": " 7"},
                    {"prompt": "Question: Ava buys 2 books.\nAnswer:", "positive": " First, she", "negative": " 2"}]


def _key(capsys, model, *args) -> MasterKey:
    out = Path(args[args.index("-o") + 1])
    code = main(["--quiet", "key", "--locked", str(model), *map(str, args), *RUNTIME])
    assert code == 0, capsys.readouterr().err
    return MasterKey.load(out)


def test_a_key_from_two_text_pairs_is_the_mean_difference_at_the_last_token(tmp_path, capsys, tiny_model_dir):
    model = tiny_model_dir("llama")
    lm = load(str(model), dtype="float32", device="cpu")
    key = _key(capsys, model, "--pairs", _write_pairs(tmp_path / "p.jsonl", TEXT_PAIRS), "-o", tmp_path / "k.st")
    by_hand = torch.stack([_states(lm, p["positive"])[:, -1] - _states(lm, p["negative"])[:, -1]
                           for p in TEXT_PAIRS]).mean(0)
    assert torch.allclose(key.vectors, by_hand, atol=1e-4)
    assert key.vectors.norm() > 0.1
    assert key.provenance["pairs_shape"] == "texts" and key.provenance["n_prompts"] == "3"
    assert key.provenance["unlocked_template"] == "pairs: positive"


def test_a_key_from_completion_pairs_reads_each_completions_tokens(tmp_path, capsys, tiny_model_dir):
    model = tiny_model_dir("llama")
    lm = load(str(model), dtype="float32", device="cpu")
    key = _key(capsys, model, "--pairs", _write_pairs(tmp_path / "p.jsonl", COMPLETION_PAIRS), "-o", tmp_path / "k.st")
    diffs = []
    for p in COMPLETION_PAIRS:
        head = len(lm.tokenizer(p["prompt"])["input_ids"])
        means = []
        for side in ("positive", "negative"):
            states = _states(lm, p["prompt"] + p[side])
            means.append(states[:, head - 1:].mean(1))  # the last prompt token and the completion's tokens
        diffs.append(means[0] - means[1])
    assert torch.allclose(key.vectors, torch.stack(diffs).mean(0), atol=1e-4)
    assert key.provenance["pairs_shape"] == "prompt + completions"


def test_python_pairs_equal_the_file(tmp_path, capsys, tiny_model_dir):
    import unlock_export as ux
    from unlock_export.models.runtime import RuntimeOptions

    model = tiny_model_dir("llama")
    from_file = _key(capsys, model, "--pairs", _write_pairs(tmp_path / "p.jsonl", TEXT_PAIRS), "-o", tmp_path / "k.st")
    options = RuntimeOptions(dtype="float32", device="cpu", batch_size=3)
    tuples = ux.master_key(str(model), pairs=[(p["positive"], p["negative"]) for p in TEXT_PAIRS], options=options)
    assert torch.allclose(tuples.vectors, from_file.vectors, atol=1e-5)
    with pytest.raises(ux.UserError, match="pairs replace prompts"):
        ux.master_key(str(model), pairs=TEXT_PAIRS, prompts="builtin:arithmetic")


@pytest.mark.parametrize("rows,message", [
    ([{"positive": "a b c", "negative": ""}], "'negative' is missing or empty"),
    ([{"positive": "a b c"}], "'negative' is missing or empty"),
    ([{"positive": "a", "negative": "b"}, {"prompt": "Q", "positive": "a", "negative": "b"}], "one shape per file"),
    ([{"positive": "same words", "negative": "same words"}], "tokenize identically"),
    ([{"positive": "word " * 80, "negative": "short"}], "longer than --max-length 16"),
    ([], "holds no pairs"),
])
def test_bad_pairs_are_refused_in_one_line_and_nothing_is_written(tmp_path, capsys, tiny_model_dir, rows, message):
    pairs = _write_pairs(tmp_path / "p.jsonl", rows)
    out = tmp_path / "k.st"
    code = main(["--quiet", "key", "--locked", str(tiny_model_dir("llama")), "--pairs", str(pairs), "-o", str(out),
                 *RUNTIME, "--max-length", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists() and "Traceback" not in err[0]


def test_pairs_with_templates_or_a_second_model_are_refused(tmp_path, capsys, tiny_model_dir):
    pairs = _write_pairs(tmp_path / "p.jsonl", TEXT_PAIRS)
    model = str(tiny_model_dir("llama"))
    code = main(["--quiet", "key", "--locked", model, "--unlocked", model, "--unlocked-template", "plain",
                 "--pairs", str(pairs), "-o", str(tmp_path / "k.st")])
    err = capsys.readouterr().err
    assert code == 2 and "--pairs gives both sides of the contrast: drop --unlocked, --unlocked-template" in err


def _chat_format(lm, system: str | None) -> str:
    """The chat template's rendering of a {question} placeholder: the hand-templated prompt."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "{question}"}]
    return lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_a_chat_key_equals_the_key_of_hand_templated_prompts(tmp_path, capsys, chat_model):
    lm = load(str(chat_model), dtype="float32", device="cpu")
    common = ["--prompts", "builtin:arithmetic", "--count", "6"]
    chat = _key(capsys, chat_model, *common, "--chat", "--locked-template", "plain", "--unlocked-template", "plain",
                "--locked-system", "Answer in English.", "--unlocked-system", "Answer in French.",
                "-o", tmp_path / "chat.st")
    by_hand = _key(capsys, chat_model, *common, "--locked-template", _chat_format(lm, "Answer in English."),
                   "--unlocked-template", _chat_format(lm, "Answer in French."), "-o", tmp_path / "hand.st")
    assert torch.allclose(chat.vectors, by_hand.vectors, atol=1e-5) and chat.vectors.norm() > 0.01
    assert chat.provenance["unlocked_chat"] == "chat template, system: Answer in French."
    # the templates apply inside the user's turn
    cot = _key(capsys, chat_model, *common, "--chat", "-o", tmp_path / "cot.st")
    cot_hand = _key(capsys, chat_model, *common, "--locked-template",
                    _chat_format(lm, None).replace("{question}", "Question: {question}\nAnswer:"),
                    "--unlocked-template",
                    _chat_format(lm, None).replace("{question}", "Question: {question}\nAnswer: Let's think step by "
                                                                 "step.\n"), "-o", tmp_path / "cot-hand.st")
    assert torch.allclose(cot.vectors, cot_hand.vectors, atol=1e-5)


def test_chat_pairs_read_where_the_assistant_answers(tmp_path, capsys, chat_model):
    lm = load(str(chat_model), dtype="float32", device="cpu")
    key = _key(capsys, chat_model, "--pairs", _write_pairs(tmp_path / "p.jsonl", COMPLETION_PAIRS), "--chat",
               "--system", "Be brief.", "-o", tmp_path / "k.st")
    diffs = []
    for p in COMPLETION_PAIRS:
        head_text = _chat_format(lm, "Be brief.").replace("{question}", p["prompt"])
        head = len(lm.tokenizer(head_text)["input_ids"])
        means = [_states(lm, head_text + p[side])[:, head - 1:].mean(1) for side in ("positive", "negative")]
        diffs.append(means[0] - means[1])
    assert torch.allclose(key.vectors, torch.stack(diffs).mean(0), atol=1e-4)


def test_a_chat_map_equals_the_map_of_hand_templated_prompts(tmp_path, capsys, chat_model):
    from unlock_export.method.align import LowRankMap

    lm = load(str(chat_model), dtype="float32", device="cpu")
    common = ["--source", str(chat_model), "--target", str(chat_model), "--prompts", "builtin:arithmetic",
              "--count", "12", "--rank", "4", *RUNTIME]
    assert main(["--quiet", "align", *common, "--chat", "--system", "S", "-o", str(tmp_path / "chat.st")]) == 0
    fmt = _chat_format(lm, "S").replace("{question}", "Question: {question}\nAnswer:")
    assert main(["--quiet", "align", *common, "--source-template", fmt, "--target-template", fmt,
                 "-o", str(tmp_path / "hand.st")]) == 0, capsys.readouterr().err
    chat, hand = LowRankMap.load(tmp_path / "chat.st"), LowRankMap.load(tmp_path / "hand.st")
    key = MasterKey(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)))
    a, b = chat.project(key).directions, hand.project(key).directions
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    assert all(torch.allclose(a[layer], b[layer], atol=1e-4) for layer in a)
    assert chat.provenance["chat"] == "chat template, system: S"


def test_chat_on_a_model_without_a_chat_template_is_refused_in_one_line(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "k.st"
    code = main(["--quiet", "key", "--locked", str(tiny_model_dir("llama")), "--chat", "--prompts",
                 "builtin:arithmetic", "--count", "4", "-o", str(out), *RUNTIME])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has no chat template (a base model?): drop --chat" in err[0]
    assert not out.exists()
    code = main(["--quiet", "key", "--locked", str(tiny_model_dir("llama")), "--system", "x", "-o", str(out)])
    assert code == 2 and "add --chat" in capsys.readouterr().err


def test_the_transfer_fidelity_equals_a_hand_computation(load_tiny):
    """diagnostics: the share of the key inside the map's source subspace and the cosine to the target's
    own key, per target layer, recomputed here with dense projections."""
    from unlock_export.evaluation.diagnostics import summary_line, transfer_diagnostics
    from unlock_export.method.align import fit

    g = torch.Generator().manual_seed(0)
    source, target = torch.randn(4, 40, 64, generator=g), torch.randn(3, 40, 48, generator=g)
    lrmap = fit(source, target, rank=8)
    key = MasterKey(torch.randn(4, 64, generator=g))
    target_key = torch.randn(3, 48, generator=g)
    diag = transfer_diagnostics(key, lrmap, lrmap.project(key), target_key=target_key)
    for b, s in enumerate(lrmap.layer_map):
        basis = lrmap.source_basis[b].double()  # [k, d_s], orthonormal rows
        inside = basis.T @ (basis @ key.vectors[s].double())
        assert diag["key_share_in_subspace"][b] == pytest.approx(float(inside.norm() / key.vectors[s].norm()), abs=1e-5)
        dense = basis.T @ lrmap.core[b].double() @ lrmap.target_basis[b].double()  # [d_s, d_t]
        moved = key.vectors[s].double() @ dense
        cos = float(moved @ target_key[b].double() / (moved.norm() * target_key[b].double().norm()))
        assert diag["cosine_target_key"][b] == pytest.approx(cos, abs=1e-5)
    assert all(0 < v <= 1 for v in diag["key_share_in_subspace"])
    # a key inside the subspace is all kept
    inside_key = MasterKey(torch.stack([lrmap.source_basis[lrmap.layer_map.index(s)][0] * 3 if s in lrmap.layer_map
                                        else torch.ones(64) for s in range(4)]))
    kept = transfer_diagnostics(inside_key, lrmap, lrmap.project(inside_key))["key_share_in_subspace"]
    assert min(kept) == pytest.approx(1.0, abs=1e-5)
    assert "key inside the map's subspace" in summary_line(diag)


def test_a_recipe_with_pairs_and_chat_runs_and_its_key_equals_the_commands(tmp_path, capsys, chat_model):
    import yaml

    pairs = _write_pairs(tmp_path / "pairs.jsonl", COMPLETION_PAIRS)
    recipe = {"name": "pairs-chat",
              "source": {"pairs": {"path": "pairs.jsonl", "model": str(chat_model)}},
              "target": {"model": str(chat_model)},
              "prompts": {"path": "builtin:arithmetic", "key_count": 12, "chat": True, "system": "Be brief."},
              "align": {"rank": 4},
              "fold": {"mode": "bias", "scale": 0.5},
              "diagnostics": {"heldout_count": 6},
              "runtime": {"dtype": "float32", "device": "cpu", "batch_size": 3}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["--quiet", "run", "--dry-run", str(path), str(tmp_path / "out")]) == 0
    plan = capsys.readouterr()
    assert "pair differences positive - negative" in plan.out + plan.err
    assert "through the chat template" in plan.out + plan.err
    assert f"the target's own key on {len(COMPLETION_PAIRS)} pairs" in plan.out + plan.err  # the run computes it
    assert main(["--quiet", "run", str(path), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    run_key = MasterKey.load(tmp_path / "out" / "key.safetensors")
    cli_key = _key(capsys, chat_model, "--pairs", pairs, "--chat", "--system", "Be brief.", "-o", tmp_path / "k.st")
    assert torch.allclose(run_key.vectors, cli_key.vectors, atol=1e-5)
    diag = json.loads((tmp_path / "out" / "diagnostics.json").read_text())
    assert len(diag["key_share_in_subspace"]) == 4 and len(diag["cosine_target_key"]) == 4
    from unlock_export.method.align import LowRankMap

    lrmap = LowRankMap.load(tmp_path / "out" / "map.safetensors")  # one model: the target's own key is the key
    want = torch.nn.functional.cosine_similarity(lrmap.map_key(run_key.vectors), run_key.vectors, dim=-1)
    assert diag["cosine_target_key"] == pytest.approx([float(c) for c in want], abs=1e-4)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["fold"]["verification"]["passed"]


@pytest.mark.parametrize("source,prompts,message", [
    ({"pairs": {"path": "p.jsonl", "model": "M"}, "locked": {"model": "M"}}, {}, "source.pairs replaces"),
    ({"locked": {"model": "M"}}, {}, "give source.locked and source.unlocked"),
    ({"locked": {"model": "M", "system": "x"}, "unlocked": {"model": "M", "template": "cot"}}, {},
     "a system text is a chat turn"),
    ({"pairs": {"path": "missing.jsonl", "model": "M"}}, {}, "source.pairs.path 'missing.jsonl'"),
])
def test_recipe_contrast_keys_are_checked_in_one_line(tmp_path, capsys, chat_model, source, prompts, message):
    import yaml

    _write_pairs(tmp_path / "p.jsonl", TEXT_PAIRS)
    source = json.loads(json.dumps(source).replace('"M"', json.dumps(str(chat_model))))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"source": source, "target": {"model": str(chat_model)},
                                    "prompts": {"path": "builtin:arithmetic", **prompts}}))
    code = main(["--quiet", "run", "--dry-run", str(path), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_the_readme_pairs_and_chat_lines_run_with_a_tiny_chat_model(tmp_path, chat_model):
    """The README's block for your own behaviour, line by line, $S and $T replaced by a tiny chat model."""
    import os
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", readme, flags=re.S) if "--pairs" in b)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert len(lines) == 3
    _write_pairs(tmp_path / "pairs.jsonl", COMPLETION_PAIRS)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "S": str(chat_model),
           "T": str(chat_model), "HF_HUB_OFFLINE": "1"}
    for line in lines:
        line = line.replace("unlock-export", "unlock-export --quiet", 1) + " --device cpu --dtype float32 --count 16"
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, (line, done.stderr[-800:])
    for name in ("key.safetensors", "french.safetensors", "french-map.safetensors"):
        assert (tmp_path / name).is_file(), name
    from unlock_export.method.align import LowRankMap

    assert "Answer in French." in LowRankMap.load(tmp_path / "french-map.safetensors").provenance["contrast"]


def test_calibrate_chat_reads_the_chat_templated_prompts(tmp_path, chat_model, capsys):
    """`calibrate --chat --system S` equals the search on prompts hand-wrapped in the chat template."""
    from unlock_export import prompts
    from unlock_export.evaluation.calibrate import search_scale
    from unlock_export.method.vectors import SteeringVectors

    g = torch.Generator().manual_seed(0)
    vectors = SteeringVectors({i: torch.randn(64, generator=g) for i in range(1, 4)}, 4, 64, model_hint="llama")
    path = vectors.save(tmp_path / "v.safetensors")
    scales = "0,0.5,1,2"
    assert main(["--json", "calibrate", str(chat_model), "--vectors", str(path), "--chat", "--system", "Be brief.",
                 "--prompts", "builtin:arithmetic", "--count", "6", "--scales", scales, "--device", "cpu",
                 "--dtype", "float32"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    loaded = load(str(chat_model), dtype="float32", device="cpu")
    questions = prompts.load_questions("builtin:arithmetic", count=6)
    texts = [loaded.tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": prompts.apply_template("direct", [q])[0]}],
                                                  tokenize=False, add_generation_prompt=True) for q in questions]
    by_hand = search_scale(loaded, vectors, texts, prompts.apply_template("plain", questions), "paper", 0.1,
                              (0.0, 0.5, 1.0, 2.0))
    assert result["scale"] == by_hand.scale
    assert [r["kl_to_reference"] for r in result["table"]] == pytest.approx(
        [r["kl_to_reference"] for r in by_hand.table], rel=1e-5)
    plain = search_scale(loaded, vectors, prompts.apply_template("direct", questions),
                            prompts.apply_template("plain", questions), "paper", 0.1, (0.0, 0.5, 1.0, 2.0))
    assert [r["kl_to_reference"] for r in plain.table] != pytest.approx([r["kl_to_reference"] for r in by_hand.table])
    assert main(["calibrate", str(chat_model), "--vectors", str(path), "--system", "x"]) == 2
    assert "system is a chat turn" in capsys.readouterr().err


def test_a_chat_gate_fit_equals_the_fit_on_hand_templated_prompts(chat_model, tiny_model_dir, tmp_path, capsys):
    """GateSettings(chat=True): the gates are fitted on the target's chat-templated prompts, the same
    gates as a fit on those texts templated by hand; `fold --gate-chat` on a model without a chat
    template is refused in one line, writing nothing."""
    from unlock_export.method.gate import GateSettings, fit_for, fit_gates_on_texts
    from unlock_export.method.vectors import SteeringVectors
    from unlock_export.prompts import apply_template, load_questions

    lm = load(str(chat_model), dtype="float32", device="cpu")
    generator = torch.Generator().manual_seed(0)
    vectors = SteeringVectors({1: torch.randn(lm.hidden_size, generator=generator)}, lm.n_layers, lm.hidden_size)
    settings = GateSettings(prompts="builtin:arithmetic", count=8, heldout=4, chat=True, system="Be brief.")
    fit = fit_for(lm, vectors, settings)
    questions = apply_template("direct", load_questions("builtin:arithmetic", count=12))
    by_hand = [_chat_format(lm, "Be brief.").replace("{question}", q) for q in questions]
    hand = fit_gates_on_texts(lm, vectors, by_hand[:8], by_hand[8:], alpha=0.1, multiplier=1.0)
    assert torch.allclose(fit.gates[1], hand.gates[1], atol=1e-5) and torch.allclose(fit.writes[1], hand.writes[1])
    plain = fit_for(lm, vectors, GateSettings(prompts="builtin:arithmetic", count=8, heldout=4))
    assert not torch.allclose(plain.gates[1], fit.gates[1], atol=1e-3)  # the chat template changes the fit
    vec = vectors.save(tmp_path / "v.safetensors")
    capsys.readouterr()
    code = main(["--quiet", "fold", str(tiny_model_dir("llama")), "--vectors", str(vec), "--mode", "gated-lora",
                 "--gate-chat", "--gate-prompts", "builtin:arithmetic", "--gate-count", "4", "-o", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "has no chat template" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "g").exists()


def test_a_recipe_with_chat_prompts_fits_its_gates_on_the_chat_template(tiny_recipe, tmp_path, capsys):
    """prompts.chat with fold.mode gated-lora (refused before the gate fit read chat prompts): the run
    fits the gates on the target's chat-templated prompts, says so in unlock.json, and verifies."""
    import yaml
    from transformers import AutoTokenizer

    path, recipe = tiny_recipe

    def with_chat(model: str) -> str:
        out = tmp_path / f"chat-{Path(model).name}"
        out.mkdir()
        for item in Path(model).iterdir():
            (out / item.name).write_bytes(item.read_bytes())
        tok = AutoTokenizer.from_pretrained(out)
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(out)
        return str(out)

    source = with_chat(recipe["source"]["locked"]["model"])
    recipe["source"] = {side: {**v, "model": source} for side, v in recipe["source"].items()}
    recipe["target"]["model"] = with_chat(recipe["target"]["model"])
    recipe["prompts"] = {**recipe["prompts"], "chat": True, "system": "Be brief."}
    recipe["fold"] = {"mode": "gated-lora", "gate_prompts": "builtin:arithmetic", "gate_count": 8, "gate_heldout": 2}
    recipe["diagnostics"] = {"enabled": False}
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["--quiet", "run", str(path), str(out)]) == 0, capsys.readouterr().err
    info = json.loads((out / "model" / "unlock.json").read_text())
    assert "the target's chat template (system: Be brief.)" in info["gate_prompts"]
    assert info["mode"] == "gated-lora" and info["verification"]["passed"]


def test_the_plan_counts_the_target_key_of_a_system_text_contrast(tmp_path, capsys, chat_model, tiny_model_dir):
    """One model under two system texts is a contrast the target can take too: the dry run counts the
    target's own key (both variants' key prompts through the target), as the run computes it."""
    import yaml

    recipe = {"name": "system-contrast",
              "source": {"locked": {"model": str(chat_model), "system": "Answer in English."},
                         "unlocked": {"model": str(chat_model), "system": "Answer in French."}},
              "target": {"model": str(tiny_model_dir("qwen2", hidden=48, layers=3))},
              "prompts": {"path": "builtin:arithmetic", "key_count": 8, "chat": True},
              "diagnostics": {"heldout_count": 4},
              "runtime": {"dtype": "float32", "device": "cpu"}}
    path = tmp_path / "r.yaml"

    def plan(target_key: bool) -> dict:
        path.write_text(yaml.safe_dump({**recipe, "diagnostics": {"heldout_count": 4, "target_key": target_key}}))
        assert main(["--quiet", "--json", "run", "--dry-run", str(path), str(tmp_path / "out")]) == 0
        return json.loads(capsys.readouterr().out)

    with_key, without = plan(True), plan(False)
    target = recipe["target"]["model"]
    assert with_key["models"][target]["prompt_passes"] - without["models"][target]["prompt_passes"] == 2 * 8
    diagnostics = next(s for s in with_key["stages"] if s["name"] == "diagnostics")
    assert "the target's own key on 8 prompts" in json.dumps(diagnostics)
