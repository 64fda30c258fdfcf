"""`gguf ADAPTER`: a PEFT LoRA (fold --mode gated-lora, any rank) as a llama.cpp LoRA adapter GGUF.

Unit tests read the file back with gguf-py: the metadata llama.cpp's adapter loader checks
(general.type, adapter.type, adapter.lora.alpha, the architecture), the tensor names and the shapes
it validates against the base model (lora_a ne = [in, r], lora_b ne = [r, out]), and values equal
to the adapter's; what llama.cpp's LoRA cannot express is refused in one line with nothing written.
Engine tests serve it with the pinned llama-server (`--lora`, the scale chosen per request) and
compare with PEFT in transformers (float32) at each scale, and run `eval --engine llamacpp --lora`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from unlock_export.cli import main
from unlock_export.method.vectors import SteeringVectors

GATE = ["--gate-prompts", "builtin:arithmetic", "--gate-count", "16"]


def _vectors(layers=(1, 2, 3), hidden=64, n_layers=4, seed=0, model_hint="llama") -> SteeringVectors:
    g = torch.Generator().manual_seed(seed)
    return SteeringVectors({L: torch.randn(hidden, generator=g) for L in layers}, n_layers, hidden,
                           "layer_output", model_hint)


def _fold(src, tmp_path: Path, mode: str, name: str, vectors=None, extra=()) -> Path:
    vec = (vectors or _vectors()).save(tmp_path / f"{name}-v.safetensors")
    out = tmp_path / name
    args = ["--quiet", "fold", str(src), "--vectors", str(vec), "--mode", mode, *extra, "-o", str(out)]
    if mode == "gated-lora":
        args[-2:-2] = GATE
    assert main(args) == 0
    return out


def _read(path: Path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    tensors = {t.name: (list(map(int, t.shape)), np.array(t.data)) for t in reader.tensors}
    return fields, tensors


def _peft_pairs(adapter: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module: (lora_A, lora_B)} of the adapter's safetensors file."""
    raw = load_file(adapter / "adapter_model.safetensors")
    modules = sorted({k.split(".lora_")[0] for k in raw})
    return {m.removeprefix("base_model.model."): (raw[f"{m}.lora_A.weight"].numpy(), raw[f"{m}.lora_B.weight"].numpy())
            for m in modules}


def _gguf_name(module: str) -> str:
    """The llama.cpp name the test expects for a Llama-layout module path (written out here, not imported)."""
    layer, rest = module.split(".")[2], ".".join(module.split(".")[3:])
    return f"blk.{layer}.{ {'mlp.down_proj': 'ffn_down', 'self_attn.o_proj': 'attn_output'}[rest] }.weight"


def _assert_same_as_adapter(out: Path, adapter: Path, arch: str, alpha: float):
    fields, tensors = _read(out)
    assert fields["general.architecture"] == arch
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(alpha, abs=0)
    pairs = _peft_pairs(adapter)
    expected = {f"{_gguf_name(m)}.{s}" for m in pairs for s in ("lora_a", "lora_b")}
    assert set(tensors) == expected
    for module, (a, b) in pairs.items():
        name = _gguf_name(module)
        (ne_a, data_a), (ne_b, data_b) = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        rank, n_in = a.shape
        n_out = b.shape[0]
        # llama-adapter.cpp: model ne[0] (in) == lora_a ne[0], lora_a ne[1] == lora_b ne[0] (r), model ne[1] == lora_b ne[1]
        assert ne_a == [n_in, rank] and ne_b == [rank, n_out]
        assert data_a.dtype == np.float32 and data_b.dtype == np.float32
        np.testing.assert_array_equal(data_a.reshape(a.shape), a)
        np.testing.assert_array_equal(data_b.reshape(b.shape), b)
    return fields, tensors


# -- unit: the file ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 2])
def test_gated_lora_adapter_as_llama_cpp_lora_gguf(rank, tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("llama")
    adapter = _fold(src, tmp_path, "gated-lora", "gated", extra=["--multiplier", "3", "--rank", str(rank)])
    capsys.readouterr()
    out = tmp_path / "lora.gguf"
    assert main(["gguf", str(adapter), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == rank
    fields, tensors = _assert_same_as_adapter(out, adapter, "llama", float(config["lora_alpha"]))
    assert len(tensors) == 6  # layers 1-3, lora_a and lora_b each
    assert tensors["blk.1.ffn_down.weight.lora_a"][0] == [128, rank]  # ne: [intermediate size, r]
    assert fields["unlock_export.mode"] == "gated-lora" and fields["unlock_export.adapter_of"] == str(src)
    assert f"--lora {out}" in printed and "llama-server -m BASE.gguf" in printed
    assert '"lora": [{"id": 0, "scale": 1}]' in printed
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert main(["--json", "inspect", str(out)]) == 0  # inspect says what the file is
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "llama.cpp lora adapter" and info["rank"] == rank and info["layers"] == "1-3"


def test_rank_two_peft_lora_on_two_modules_keeps_peft_scaling(tiny_model_dir, tmp_path):
    """Any rank and alpha: a PEFT-made rank-2 LoRA (lora_alpha 4, so PEFT scales by 2) on down_proj and
    o_proj of a qwen2 model, with no unlock.json (the family comes from its base folder's config.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from unlock_export.export.lora_gguf import write_lora_gguf

    src = tiny_model_dir("qwen2")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=["model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj"])
    torch.manual_seed(1)
    get_peft_model(model, config).save_pretrained(tmp_path / "r2")
    assert not (tmp_path / "r2" / "unlock.json").exists()
    info = write_lora_gguf(tmp_path / "r2", tmp_path / "r2.gguf")
    assert info["rank"] == 2 and info["peft_scaling"] == 2.0
    _assert_same_as_adapter(tmp_path / "r2.gguf", tmp_path / "r2", "qwen2", alpha=4.0)  # llama.cpp: alpha / r = 2

    # rsLoRA scales by alpha / sqrt(r): the written alpha makes llama.cpp's alpha / r the same
    cfg_path = tmp_path / "r2" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_rslora": True}))
    info = write_lora_gguf(tmp_path / "r2", tmp_path / "rs.gguf")
    assert _read(tmp_path / "rs.gguf")[0]["adapter.lora.alpha"] / 2 == pytest.approx(4 / np.sqrt(2), rel=1e-6)


def _fake_base(path: Path, arch: str, layers: int = 4, hidden: int = 64) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_tensor("token_embd.weight", np.zeros((8, hidden), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """A gated-lora adapter, a BEFT adapter and a LoRA with lora_bias, folded once from the tiny llama."""
    root = tmp_path_factory.mktemp("adapters")
    src = tiny_model_dir("llama")
    return {"gated": _fold(src, root, "gated-lora", "gated"), "beft": _fold(src, root, "adapter", "beft"),
            "lora_bias": _fold(src, root, "lora", "lora-bias")}


def _edited(adapter: Path, tmp_path: Path, **changes) -> Path:
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(adapter, copy)
    cfg = copy / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **changes}))
    return copy


@pytest.mark.parametrize("case,message", [
    ("beft", "is a BEFT adapter (a bias per module), which llama.cpp's LoRA cannot express: fold with --mode bias"),
    ("lora_bias", "has lora_bias (a bias on lora_B), which llama.cpp's LoRA drops: fold with --mode bias"),
    ("fan_in_fan_out", "adapts Conv1D modules (fan_in_fan_out, GPT-2)"),
    ("dora", "is a DoRA adapter"),
    ("other_module", "has no llama.cpp LoRA name here"),
    ("wrong_base", "is a 'qwen2' GGUF but the adapter is for a 'llama' model"),
    ("short_base", "is layer 3 but"),
    ("route", "drop --route"),
])
def test_what_llama_cpp_lora_cannot_express_is_refused_in_one_line(case, message, adapters, tmp_path, capsys):
    adapter, extra = adapters["gated"], []
    if case in ("beft", "lora_bias"):
        adapter = adapters[case]
    elif case == "fan_in_fan_out":
        adapter = _edited(adapter, tmp_path, fan_in_fan_out=True)
    elif case == "dora":
        adapter = _edited(adapter, tmp_path, use_dora=True)
    elif case == "other_module":
        from safetensors.torch import save_file

        adapter = _edited(adapter, tmp_path)
        raw = load_file(adapter / "adapter_model.safetensors")
        save_file({k.replace("mlp.down_proj", "mlp.up_proj"): v for k, v in raw.items()},
                  str(adapter / "adapter_model.safetensors"))
    elif case == "wrong_base":
        extra = ["--base", str(_fake_base(tmp_path / "base.gguf", "qwen2"))]
    elif case == "short_base":
        extra = ["--base", str(_fake_base(tmp_path / "base.gguf", "llama", layers=3))]
    elif case == "route":
        extra = ["--route", "convert"]
    out = tmp_path / "out" / "lora.gguf"
    out.parent.mkdir()
    capsys.readouterr()
    code = main(["--quiet", "gguf", str(adapter), *extra, "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert list(out.parent.iterdir()) == []  # nothing written, no temporary file left behind


def test_a_matching_base_gguf_is_accepted_and_named_in_the_serve_command(adapters, tmp_path, capsys):
    base = _fake_base(tmp_path / "base.gguf", "llama")
    capsys.readouterr()
    assert main(["gguf", str(adapters["gated"]), "--base", str(base), "-o", str(tmp_path / "l.gguf")]) == 0
    assert f"llama-server -m {base} --lora {tmp_path / 'l.gguf'} --port 8080" in capsys.readouterr().out
    code = main(["--quiet", "gguf", str(adapters["gated"]), "--base", str(base), "-o", str(tmp_path / "l.gguf")])
    assert code == 2 and "exists" in capsys.readouterr().err  # no silent overwrite


def test_serve_commands_lists_the_lora_route():
    from unlock_export.export.serving import lora_request, serve_commands

    rows = serve_commands(lora_gguf="out/gated-lora.gguf", target_gguf="target.gguf")
    assert [r.command for r in rows] == ["llama-server -m target.gguf --lora out/gated-lora.gguf --port 8080"]
    body = json.loads(lora_request(0.5).split(" -d ", 1)[1].strip("'"))
    assert body["lora"] == [{"id": 0, "scale": 0.5}]


# -- engines: the pinned llama-server ----------------------------------------------------------------
N_PREDICT = 12
N_PROBS = 10
LOGPROB_TOL = 1e-4  # tiny float32 models, F32 KV cache, no flash attention: measured <= 1.1e-5
# llama-server's default (-fa auto) turns flash attention on here, which moves a log-probability by 2e-3 to 9e-3,
# the unsteered model included (the greedy text is the same); the tests turn it off, as the binding runs
# (tests/engine_scripts/llama_logits.py: flash_attn off)
NO_FLASH_ATTN = ["-fa", "off"]
MULTIPLIER = "12"  # large enough that the gated edit changes greedy text at scale 1 and again at 2


def _documented(flag: str) -> list[str]:
    from test_serve_commands import doc_commands

    found = [argv for where, argv, _ in doc_commands(("llama-server",))
             if where == "docs/serving.md" and flag in argv and "-m" in argv]
    assert found, f"docs/serving.md shows no llama-server command with {flag}"
    return found[0]


def _documented_lora_field() -> list[dict]:
    """The `lora` field of docs/serving.md's per-request curl example, parsed."""
    import re
    import shlex

    text = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("curl ") and '"lora"' in ln]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    assert any(re.fullmatch(r"http://127\.0\.0\.1:\d+/completion", a) for a in argv), argv
    return json.loads(argv[argv.index("-d") + 1])["lora"]


@pytest.fixture(scope="module")
def lora_for(served_tiny, tmp_path_factory):
    """lora_for(rank): the tiny served llama, its float32 GGUF, a gated-lora fold of it with `rank` gates
    per layer and that fold as a LoRA GGUF (made once per rank)."""
    from engines import llama_cpp_src

    from unlock_export.export.gguf import convert_gguf

    cache: dict = {}

    def make(rank: int) -> dict:
        if rank not in cache:
            m = served_tiny("llama")
            if "base" not in m:
                m["base"] = m["root"] / "base-f32.gguf"
                convert_gguf(m["dir"], m["base"], llama_cpp=llama_cpp_src(), outtype="f32")
            root = tmp_path_factory.mktemp(f"served-lora-r{rank}")
            adapter = _fold(m["dir"], root, "gated-lora", "gated", vectors=m["vectors"],
                            extra=["--multiplier", MULTIPLIER, "--rank", str(rank)])
            lora = root / "gated-lora.gguf"
            assert main(["--quiet", "gguf", str(adapter), "--base", str(m["base"]), "-o", str(lora)]) == 0
            cache[rank] = {**m, "adapter": adapter, "lora": lora, "rank": rank}
        return cache[rank]

    return make


@pytest.fixture
def served_lora(lora_for):
    return lora_for(1)


def peft_reference(m: dict, scale: float, prompts: list[list[int]], n: int = N_PREDICT) -> list[dict]:
    """PEFT on the float32 base, lora_B multiplied by `scale`: greedy tokens (EOS suppressed, as the
    server's ignore_eos) and the top-N log-probabilities at each generated position."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(m["dir"], dtype=torch.float32),
                                      m["adapter"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.inference_mode():
            seq = model.generate(input_ids=x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            logprobs = torch.log_softmax(model(input_ids=seq).logits[0, len(ids) - 1:-1].double(), -1)
        top = [dict(zip(*(t.tolist() for t in row.topk(N_PROBS)[::-1]))) for row in logprobs]
        tokens = seq[0, len(ids):].tolist()
        out.append({"tokens": tokens, "text": m["tokenizer"].decode(tokens), "top": top})
    return out


def served(post, prompts: list[list[int]], lora: list[dict] | None) -> list[dict]:
    rows = []
    for ids in prompts:
        body = {"prompt": ids, "n_predict": N_PREDICT, "temperature": 0, "top_k": 1, "n_probs": N_PROBS,
                "ignore_eos": True, "cache_prompt": False, "seed": 0, "return_tokens": True}
        answer = post("/completion", body if lora is None else {**body, "lora": lora})
        steps = answer["completion_probabilities"]
        assert len(steps) == N_PREDICT, answer
        rows.append({"tokens": [s["id"] for s in steps], "text": answer["content"],
                     "top": [{t["id"]: t["logprob"] for t in s["top_logprobs"]} for s in steps]})
    return rows


def gap(engine: list[dict], reference: list[dict]) -> float:
    """Largest |dlogprob| over the reference's top tokens, the greedy tokens being equal."""
    assert [r["tokens"] for r in engine] == [r["tokens"] for r in reference]
    worst = 0.0
    for e, r in zip(engine, reference):
        for te, tr in zip(e["top"], r["top"]):
            shared = [k for k in tr if k in te]
            assert len(shared) >= N_PROBS - 1, (sorted(te), sorted(tr))  # a tie at the 10th place may swap
            worst = max([worst] + [abs(te[k] - tr[k]) for k in shared])
    return worst


@pytest.mark.engines
@pytest.mark.parametrize("rank", [1, 2])
def test_llama_server_lora_with_per_request_scales_equals_peft(rank, lora_for, tmp_path):
    """docs/serving.md's `llama-server -m target.gguf --lora gated-lora.gguf`, run as written (paths filled
    in), with requests whose `lora` field (the documented one) sets scale 0, 1 and 2: each equals PEFT
    in transformers at that scale (lora_B times the scale), greedy text and top-10 log-probabilities;
    the scales give different texts; a request without the field gets the server's scale, 1."""
    import time

    from engines import llama_server

    m = lora_for(rank)
    assert json.loads((m["adapter"] / "adapter_config.json").read_text())["r"] == rank
    documented = _documented("--lora")
    argv = [str(m["base"]) if documented[i] == "-m" else str(m["lora"]) if documented[i] == "--lora" else tok
            for i, tok in enumerate(documented[1:])]
    assert argv == ["-m", str(m["base"]), "--lora", str(m["lora"])]
    field = _documented_lora_field()
    assert [sorted(e) for e in field] == [["id", "scale"]] and field[0]["id"] == 0

    t0 = time.monotonic()
    with llama_server(argv + NO_FLASH_ATTN, tmp_path / "server.log", ctx=512) as post:
        runs = {s: served(post, m["ids"], [{**field[0], "scale": s}]) for s in (0.0, 1.0, 2.0)}
        runs["default"] = served(post, m["ids"], None)
    t1 = time.monotonic()
    gaps = {}
    for s in (0.0, 1.0, 2.0):
        reference = peft_reference(m, s, m["ids"])
        assert [r["text"] for r in runs[s]] == [r["text"] for r in reference], s
        gaps[s] = gap(runs[s], reference)
    moved = {(a, b): sum(x != y for ra, rb in zip(runs[a], runs[b]) for x, y in zip(ra["tokens"], rb["tokens"]))
             for a, b in ((0.0, 1.0), (1.0, 2.0))}
    print(f"rank {rank}: lora per request: max |dlogprob| vs PEFT {', '.join(f'scale {s:g}: {g:.3g}' for s, g in gaps.items())}; "
          f"greedy tokens moved 0->1: {moved[0.0, 1.0]}, 1->2: {moved[1.0, 2.0]} of {N_PREDICT * len(m['ids'])} "
          f"(server {t1 - t0:.1f} s, references {time.monotonic() - t1:.1f} s)")
    assert max(gaps.values()) <= LOGPROB_TOL
    assert moved[0.0, 1.0] >= 2 and moved[1.0, 2.0] >= 2, "each scale must change the text for this test to mean anything"
    assert [r["text"] for r in runs[0.0]] != [r["text"] for r in runs[1.0]] != [r["text"] for r in runs[2.0]]
    assert runs["default"] == runs[1.0]


@pytest.mark.engines
def test_the_documented_lora_scaled_flag_is_the_server_default_scale(served_lora, tmp_path):
    """`llama-server -m target.gguf --lora-scaled gated-lora.gguf:S` (docs/serving.md): a request without
    `lora` serves what a request with scale S serves on a plain `--lora` server."""
    from engines import llama_server

    m, scale = served_lora, 2.0
    documented = _documented("--lora-scaled")
    assert documented[documented.index("--lora-scaled") + 1].count(":") == 1
    with llama_server(["-m", str(m["base"]), "--lora-scaled", f"{m['lora']}:{scale:g}", *NO_FLASH_ATTN],
                      tmp_path / "s.log",
                      ctx=512) as post:
        scaled = served(post, m["ids"], None)
    with llama_server(["-m", str(m["base"]), "--lora", str(m["lora"]), *NO_FLASH_ATTN], tmp_path / "l.log",
                      ctx=512) as post:
        asked = served(post, m["ids"], [{"id": 0, "scale": scale}])
        plain = served(post, m["ids"], [{"id": 0, "scale": 1.0}])
    assert scaled == asked
    assert [r["tokens"] for r in scaled] != [r["tokens"] for r in plain]


@pytest.mark.engines
def test_eval_llamacpp_with_lora_equals_eval_transformers(served_lora, tmp_path, capsys):
    """`eval BASE.gguf --engine llamacpp --lora FILE:S` (the LoRA GGUF, and the PEFT folder converted on the
    fly) gives the answers of `eval TARGET --lora ADAPTER:S` (transformers, stock PEFT), at a scale
    other than 1 (whose answers differ), and records the adapter and scale in summary.json."""
    m = served_lora
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n"
                            for q, a in [("What is 2 plus 3?", 5), ("The capital of France is", 0),
                                         ("Tom has 3 apples and buys 4 more. How many?", 7)]))
    common = ["--data", str(data), "--max-new-tokens", "8", "--template", "plain"]
    runs = {"cpp": [str(m["base"]), "--engine", "llamacpp", "--parallel", "2", "--lora", f"{m['lora']}:2"],
            "cpp_peft": [str(m["base"]), "--engine", "llamacpp", "--parallel", "2", "--lora", f"{m['adapter']}:2"],
            "hf": [str(m["dir"]), "--lora", f"{m['adapter']}:2"],
            "hf_1": [str(m["dir"]), "--lora", str(m["adapter"])]}
    for name, args in runs.items():
        assert main(["--quiet", "eval", *args, *common, "-o", str(tmp_path / name)]) == 0, capsys.readouterr().err

    def outputs(name):
        return [json.loads(x)["output"] for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]

    print({name: outputs(name) for name in runs})
    assert outputs("cpp") == outputs("hf") == outputs("cpp_peft")
    assert outputs("hf_1") != outputs("hf"), "the scale must change the answers for this test to mean anything"
    summary = json.loads((tmp_path / "cpp" / "summary.json").read_text())
    assert summary["engine"] == "llamacpp"
    assert summary["lora"]["path"] == str(m["lora"]) and summary["lora"]["scale"] == 2.0
    assert json.loads((tmp_path / "cpp_peft" / "summary.json").read_text())["lora"]["path"] == str(m["adapter"])


@pytest.mark.engines
def test_eval_llamacpp_refuses_a_lora_gguf_for_another_family_in_one_line(served_lora, tmp_path, capsys):
    import gguf

    m = served_lora
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), "qwen2")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 1.0)
    writer.add_tensor("blk.1.ffn_down.weight.lora_a", np.zeros((1, 128), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"question": "What is 2 plus 3?", "answer": "#### 5"}) + "\n")
    capsys.readouterr()
    for lora, message in [(other, "is a LoRA for 'qwen2' models"), (m["base"], "is not a llama.cpp LoRA GGUF")]:
        code = main(["--quiet", "eval", str(m["base"]), "--engine", "llamacpp", "--lora", str(lora), "--data",
                     str(data), "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.engines
def test_printed_lora_serve_commands_use_the_pinned_flags(adapters, tmp_path, capsys):
    """The llama-server lines serve_commands and `gguf ADAPTER` print, checked against the pinned --help
    (test_serve_commands.py's checker; docs/serving.md's lines are checked there)."""
    from test_serve_commands import commands, llama_command_problems, llama_options

    from unlock_export.export.serving import serve_commands

    capsys.readouterr()
    assert main(["gguf", str(adapters["gated"]), "-o", str(tmp_path / "lora.gguf")]) == 0
    printed = capsys.readouterr().out
    lines = [row.command for row in serve_commands(lora_gguf="out/gated-lora.gguf", target_gguf="target.gguf")]
    lines += [ln.strip() for ln in printed.splitlines() if ln.strip().startswith("llama-server")]
    argvs = [argv for line in lines for argv, _ in commands(f"`{line}`", ("llama-server",))]
    assert len(argvs) == 2 and all("--lora" in a for a in argvs), argvs
    for argv in argvs:
        assert llama_command_problems(argv, llama_options("llama-server"), mention=False) == [], argv
