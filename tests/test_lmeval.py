"""lm-evaluation-harness interop: `lm-eval-config` (lm-eval's `steered` model config), `lm-eval-task`
(the GSM8K task on the packaged questions) and a folded checkpoint under lm-eval's `hf` model.

The unmarked tests need no lm-eval. Those marked `lmeval` run lm-eval 0.4.13 itself (`make
test-lmeval` installs the `[lmeval]` extra): they skip when lm_eval is not importable, and fail
under CI (CI set), where the extra is installed first."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import yaml

from unlock_export.cli import main
from unlock_export.evaluation import lmeval
from unlock_export.evaluation.run import STOP, load_items
from unlock_export.method.steer import additive_steering
from unlock_export.method.vectors import SteeringVectors
from unlock_export.prompts import apply_template


def make_vectors(hidden=64, layers=(1, 2, 3), site="layer_output", hint="llama", seed=0, layer_count=4):
    g = torch.Generator().manual_seed(seed)
    return SteeringVectors({L: torch.randn(hidden, generator=g) for L in layers}, layer_count, hidden, site, hint)


def lm_eval_style_hooks(model, config):
    """What lm-eval 0.4.13's `steered` model does with a config (hf_steered.steer and SteeredModel.add):
    each hookpoint names a module of model.base_model; its output (a tuple's first item) gets
    steering_vector * steering_coefficient added. Returns the handles."""
    modules = dict(model.base_model.named_modules())
    assert set(config) <= set(modules), f"unresolved hookpoints: {set(config) - set(modules)}"
    handles = []
    for name, entry in config.items():
        assert entry["action"] == "add" and entry.get("bias") is None and entry.get("head_index") is None
        vec = entry["steering_vector"].to(model.dtype) * float(entry["steering_coefficient"])

        def hook(module, args, output, vec=vec):
            if isinstance(output, tuple):
                return (output[0] + vec, *output[1:])
            return output + vec

        handles.append(modules[name].register_forward_hook(hook))
    return handles


# -- the steered config (no lm-eval needed) --------------------------------------------------------

def test_steer_config_file(tmp_path, tiny_model_dir):
    vectors = make_vectors()
    vec_path = vectors.save(tmp_path / "v.safetensors")
    out = tmp_path / "steer.pt"
    model = tiny_model_dir("llama")
    assert main(["--quiet", "lm-eval-config", "--vectors", str(vec_path), "--scale", "0.75", "--model", str(model),
                 "-o", str(out)]) == 0
    config = torch.load(out, weights_only=True)
    assert list(config) == ["layers.1", "layers.2", "layers.3"]
    for layer, (name, entry) in zip((1, 2, 3), config.items()):
        assert set(entry) == {"steering_vector", "steering_coefficient", "action", "bias", "head_index"}
        assert entry["action"] == "add" and entry["bias"] is None and entry["head_index"] is None
        assert entry["steering_coefficient"] == 1.0
        assert entry["steering_vector"].dtype == torch.float32 and entry["steering_vector"].shape == (64,)
        torch.testing.assert_close(entry["steering_vector"], vectors.directions[layer] * 0.75, rtol=0, atol=0)
    # without --model: the vectors' family (llama) layout, the same names
    default = tmp_path / "default.pt"
    assert main(["--quiet", "lm-eval-config", "--vectors", str(vec_path), "--layers", "2-3", "-o", str(default)]) == 0
    assert list(torch.load(default, weights_only=True)) == ["layers.2", "layers.3"]


@pytest.mark.parametrize("arch, site, names", [
    ("llama", "post_attention", ["layers.1.self_attn.o_proj", "layers.3.self_attn.o_proj"]),
    ("gpt2", "layer_output", ["h.1", "h.3"]),
    ("gpt2", "post_attention", ["h.1.attn.c_proj", "h.3.attn.c_proj"]),
    ("gpt_neox", "layer_output", ["layers.1", "layers.3"]),
])
def test_hookpoints_follow_the_family(tiny_model_dir, arch, site, names):
    vectors = make_vectors(layers=(1, 3), site=site, hint=arch)
    assert list(lmeval.steer_config(vectors, 1.0, tiny_model_dir(arch))) == names
    assert list(lmeval.hookpoints(vectors)) == [1, 3]
    assert list(lmeval.hookpoints(vectors).values()) == names  # the registry's layout without a model


@pytest.mark.parametrize("arch, site", [("llama", "layer_output"), ("llama", "post_attention"),
                                        ("qwen2", "layer_output"), ("gpt2", "layer_output")])
def test_config_applied_as_lm_eval_does_equals_the_additive_hooks(load_tiny, tiny_model_dir, arch, site):
    lm = load_tiny(arch)
    vectors = make_vectors(site=site, hint=arch, seed=1)
    config = lmeval.steer_config(vectors, 0.5, tiny_model_dir(arch))
    ids = lm.tokenizer(apply_template("direct", ["Ava has 3 apples and buys 4 more. How many?"]), return_tensors="pt")
    with torch.no_grad():
        plain = lm.model(**ids).logits
        with additive_steering(lm, vectors, 0.5):
            hooked = lm.model(**ids).logits
        handles = lm_eval_style_hooks(lm.model, config)
        try:
            via_config = lm.model(**ids).logits
        finally:
            for handle in handles:
                handle.remove()
    assert (hooked - plain).abs().max() > 1e-2  # the steering moves the logits
    torch.testing.assert_close(via_config, hooked, rtol=0, atol=1e-5)


def test_steer_config_refusals(tmp_path, tiny_model_dir, capsys):
    vec_path = make_vectors(hidden=32).save(tmp_path / "v.safetensors")
    model = str(tiny_model_dir("llama"))
    cases = [
        (["--model", model, "-o", str(tmp_path / "a.pt")], "layers of size 64"),
        (["-o", str(tmp_path / "steer.safetensors")], ".pt or .pth"),
        (["--model", str(tmp_path), "-o", str(tmp_path / "b.pt")], "config.json"),
    ]
    for args, needle in cases:
        capsys.readouterr()
        assert main(["lm-eval-config", "--vectors", str(vec_path), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*steer*"))
    existing = tmp_path / "c.pt"
    existing.write_bytes(b"keep")
    assert main(["lm-eval-config", "--vectors", str(vec_path), "-o", str(existing)]) == 2
    assert existing.read_bytes() == b"keep"


# -- the task folder (no lm-eval needed) -----------------------------------------------------------

class _FunctionTag(yaml.SafeLoader):
    pass


_FunctionTag.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


def read_task(folder: Path, name: str = lmeval.TASK_NAME) -> dict:
    return yaml.load((folder / f"{name}.yaml").read_text(), Loader=_FunctionTag)


def test_packaged_task_is_the_writers_default(tmp_path):
    out = tmp_path / "tasks"
    assert main(["--quiet", "lm-eval-task", "-o", str(out)]) == 0
    packaged = lmeval.packaged_task_dir()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in packaged.iterdir() if p.is_file()) \
        == ["unlock_gsm8k.yaml", "utils.py"]
    for path in out.iterdir():
        assert path.read_text() == (packaged / path.name).read_text(), path.name
    task = read_task(out)
    assert task["task"] == "unlock_gsm8k" and task["output_type"] == "generate_until"
    assert task["generation_kwargs"] == {"until": STOP, "do_sample": False, "max_gen_toks": 256}
    assert task["dataset_kwargs"] == {"data": "builtin:gsm8k-dev", "offset": 0, "template": "direct", "answers": "gsm8k"}
    assert task["custom_dataset"] == "!function utils.load_docs"
    assert task["process_results"] == "!function utils.process_results"
    assert task["metric_list"][0]["metric"] == "exact_match"


def test_task_for_another_file_and_refusals(tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "5"}) + "\n")
    out = tmp_path / "t"
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["--quiet", "lm-eval-task", "-o", str(out), "--data", "mine.jsonl", "--task", "mine",
                     "--template", "cot", "--max-new-tokens", "32"]) == 0
    finally:
        os.chdir(old)
    task = read_task(out, "mine")
    assert task["dataset_kwargs"] == {"data": str(data.resolve()), "offset": 0, "template": "cot", "answers": "gsm8k"}
    assert task["generation_kwargs"]["max_gen_toks"] == 32
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer"}\n')
    for args, needle in [(["--data", str(bad)], "expected a JSON object"),
                         (["--template", "nope"], "template 'nope'"),
                         (["--task", "a b"], "task name"),
                         (["--max-new-tokens", "0"], "at least 1"),
                         ([], "exists")]:
        capsys.readouterr()
        assert main(["lm-eval-task", "-o", str(out if args == [] else tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_process_results_scores_as_eval():
    doc = {"gold": "18"}
    assert lmeval.process_results(doc, [" Janet sells 9 eggs at $2, so the answer is 18."]) == {"exact_match": 1.0}
    assert lmeval.process_results(doc, [" 16 - 3 - 4 = 9, 9 * 2 = 36"]) == {"exact_match": 0.0}
    assert lmeval.process_results(doc, [" no number"]) == {"exact_match": 0.0}
    assert lmeval.process_results({"gold": "3/4"}, [" \\boxed{\\frac{3}{4}}"]) == {"exact_match": 1.0}
    assert lmeval.process_results(doc, [" 18\nQuestion: what is 5?"]) == {"exact_match": 1.0}  # cut at STOP


def test_a_math_task_reads_and_scores_as_eval(tmp_path):
    out = tmp_path / "m"
    info = lmeval.write_task(out, data="builtin:math500", task="unlock_math500", max_new_tokens=1024)
    assert info["answers"] == "math" and info["template"] == "math" and info["questions"] == 500
    task = read_task(out, "unlock_math500")
    assert task["dataset_kwargs"] == {"data": "builtin:math500", "offset": 0, "template": "math", "answers": "math"}
    doc = {"gold": "\\left( 3, \\frac{\\pi}{2} \\right)", "answers": "math"}
    assert lmeval.process_results(doc, [" so the point is \\boxed{(3,\\pi/2)}."]) == {"exact_match": 1.0}
    assert lmeval.process_results(doc, [" \\boxed{(3, \\pi)}"]) == {"exact_match": 0.0}
    assert lmeval.process_results(doc, [" \\boxed{"]) == {"exact_match": 0.0}


# -- lm-eval itself ------------------------------------------------------------------------------

def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        message = f"lm_eval is not importable ({exc}): pip install -e '.[lmeval]' (make test-lmeval)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    import lm_eval

    return lm_eval


SCALE = 0.25
NEW_TOKENS = 16
LIMIT = 4


def lm_eval_outputs(model: str, model_args: str, task_dir: Path, batch_size: int = 1) -> tuple[list[str], list[dict]]:
    """The generations of lm-eval's `model` on the first LIMIT questions of the task, in question order,
    and its logged samples."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(task_dir), include_defaults=False)
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[lmeval.TASK_NAME],
                                      task_manager=tasks, limit=LIMIT, log_samples=True, device="cpu",
                                      batch_size=batch_size, gen_kwargs={"max_gen_toks": NEW_TOKENS})
    samples = sorted(results["samples"][lmeval.TASK_NAME], key=lambda s: s["doc_id"])
    return [s["resps"][0][0] for s in samples], samples


def eval_outputs(model: Path, out: Path, *steer: str) -> list[dict]:
    assert main(["--quiet", "eval", str(model), "--data", "builtin:gsm8k-dev", "--count", str(LIMIT),
                 "--max-new-tokens", str(NEW_TOKENS), "--dtype", "float32", "--device", "cpu", *steer,
                 "-o", str(out)]) == 0
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def steered_setup(tmp_path_factory, tiny_model_dir):
    """A tiny llama, its vectors, the fold at SCALE and `eval --form additive` on the unfolded model."""
    require_lm_eval()  # before the work, which is for lm-eval's tests only
    root = tmp_path_factory.mktemp("lmeval")
    model = tiny_model_dir("llama")
    vec_path = make_vectors(seed=2).save(root / "v.safetensors")
    folded = root / "folded"
    assert main(["--quiet", "fold", str(model), "--vectors", str(vec_path), "--scale", str(SCALE),
                 "-o", str(folded)]) == 0
    additive = eval_outputs(model, root / "ev", "--vectors", str(vec_path), "--form", "additive",
                            "--scale", str(SCALE))
    return {"root": root, "model": model, "vectors": vec_path, "folded": folded, "eval": additive}


@pytest.mark.lmeval
def test_task_docs_are_evals_prompts():
    require_lm_eval()
    docs = lmeval.load_docs(pretrained="ignored", dtype="float32")["test"]  # lm-eval passes model args too
    items = load_items("builtin:gsm8k-dev")
    assert len(docs) == len(items) == 400
    for doc, item in zip(docs.select(range(5)), items):
        assert doc["prompt"] == apply_template("direct", [item.question])[0]
        assert Fraction(doc["gold"]) == item.gold and doc["index"] == item.index


@pytest.mark.lmeval
def test_folded_checkpoint_under_lm_eval_hf_writes_evals_additive_generations(steered_setup):
    setup = steered_setup
    outputs, samples = lm_eval_outputs("hf", f"pretrained={setup['folded']},dtype=float32", lmeval.packaged_task_dir())
    rows = setup["eval"]
    assert [s["arguments"][0][0] for s in samples] == apply_template("direct", [r["question"] for r in rows])
    assert outputs == [r["output"] for r in rows]
    assert [s["exact_match"] for s in samples] == [float(r["correct"]) for r in rows]
    # the steering matters: the unfolded model unsteered writes other text (and lm-eval's hf equals eval there too)
    plain, _ = lm_eval_outputs("hf", f"pretrained={setup['model']},dtype=float32", lmeval.packaged_task_dir(),
                               batch_size=LIMIT)
    assert plain == [r["output"] for r in eval_outputs(setup["model"], setup["root"] / "plain")]
    assert plain != outputs


@pytest.mark.lmeval
def test_lm_eval_steered_model_with_the_exported_config(steered_setup):
    setup = steered_setup
    steer = setup["root"] / "steer.pt"
    task_dir = setup["root"] / "tasks"
    assert main(["--quiet", "lm-eval-config", "--vectors", str(setup["vectors"]), "--scale", str(SCALE),
                 "--model", str(setup["model"]), "-o", str(steer)]) == 0
    assert main(["--quiet", "lm-eval-task", "-o", str(task_dir)]) == 0
    outputs, _ = lm_eval_outputs("steered", f"pretrained={setup['model']},dtype=float32,steer_path={steer}", task_dir)
    assert outputs == [r["output"] for r in setup["eval"]]


@pytest.mark.lmeval
def test_lm_eval_steered_model_at_post_attention(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    vec_path = make_vectors(site="post_attention", seed=3).save(tmp_path / "v.safetensors")
    steer = tmp_path / "steer.pt"
    assert main(["--quiet", "lm-eval-config", "--vectors", str(vec_path), "--scale", "0.5", "--model", str(model),
                 "-o", str(steer)]) == 0
    rows = eval_outputs(model, tmp_path / "ev", "--vectors", str(vec_path), "--form", "additive", "--scale", "0.5")
    outputs, _ = lm_eval_outputs("steered", f"pretrained={model},dtype=float32,steer_path={steer}",
                                 lmeval.packaged_task_dir())
    assert outputs == [r["output"] for r in rows]
    assert outputs != [r["output"] for r in eval_outputs(model, tmp_path / "plain")]
