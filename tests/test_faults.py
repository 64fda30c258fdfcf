"""Faults a user meets outside bad input: a signal (Ctrl-C, SIGTERM from a scheduler, `timeout` or a
container stop, SIGKILL), two commands writing one output at once. Each case runs the real command
line in a child process, stopped at a fixed point inside its work.

SIGNALS parametrises the signal test; FAULTS lists every fault case of the suite with the test that
covers it. docs/faults.md is rendered from both by scripts/render_docs.py, which reads them with
ast.literal_eval: keep them plain literals.
"""

from __future__ import annotations

import ast
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (command, signal, what the user sees): one child process each, stopped mid-work, then signalled
SIGNALS = [
    {"command": "fold", "signal": "SIGTERM",
     "what": "exit 143 within seconds, one line; no output folder, no staging folder, no lock file"},
    {"command": "run", "signal": "SIGTERM",
     "what": "exit 143, one line naming the kept capture progress (.OUT_DIR.partial); no OUT_DIR, no staging "
             "folder; the same command with --resume finishes it"},
    {"command": "eval", "signal": "SIGTERM",
     "what": "exit 143, one line naming OUT/progress.jsonl; no summary.json or predictions.jsonl; --resume "
             "finishes it, reusing the finished chunk"},
    {"command": "eval", "signal": "SIGINT",
     "what": "exit 130 (Ctrl-C), the same one line, progress and --resume as for SIGTERM"},
    {"command": "gguf", "signal": "SIGTERM",
     "what": "exit 143, one line; no GGUF file, no temporary file"},
]

# every fault case of the suite: what happens, and the test that shows it
FAULTS = [
    {"fault": "Ctrl-C (SIGINT) while writing the shards", "command": "fold",
     "what": "exit 130, one line; no output, no staging folder",
     "test": "tests/test_fold.py::test_interrupted_export_leaves_no_output[2]"},
    {"fault": "SIGKILL while writing the shards", "command": "fold",
     "what": "no output; the staging folder stays behind (nothing can run on SIGKILL)",
     "test": "tests/test_fold.py::test_interrupted_export_leaves_no_output[9]"},
    {"fault": "a staging folder and scratch left by a SIGKILL-ed fold", "command": "fold",
     "what": "the next fold on that output removes them (their owner's pid no longer runs) and says so in one "
             "warning line per folder, then writes the output",
     "test": "tests/test_faults.py::test_the_next_run_removes_what_a_killed_one_left"},
    {"fault": "SIGKILL during a capture of run", "command": "run",
     "what": "--resume removes the stale staging folder (saying so) and continues from the finished captures; "
             "the outputs equal an uninterrupted run's",
     "test": "tests/test_faults.py::test_a_killed_run_resumes_after_its_stale_staging_folder_is_removed"},
    {"fault": "a second fold on the same output while one runs", "command": "fold",
     "what": "the second is refused in one line naming the first's pid (exit 2), even with --overwrite; the "
             "first finishes a complete output",
     "test": "tests/test_faults.py::test_a_second_writer_of_one_output_is_refused[fold]"},
    {"fault": "a second eval into the same folder while one runs", "command": "eval",
     "what": "the second is refused in one line naming the first's pid (exit 2), even with --overwrite; the "
             "first's progress and results are not mixed with another run's",
     "test": "tests/test_faults.py::test_a_second_writer_of_one_output_is_refused[eval]"},
    {"fault": "Ctrl-C during a capture", "command": "run",
     "what": "exit 130; finished batches kept; --resume gives outputs identical to an uninterrupted run",
     "test": "tests/test_cli.py::test_interrupted_run_resumes_captures_with_identical_outputs"},
    {"fault": "Ctrl-C during generation", "command": "eval",
     "what": "exit 130; finished chunks kept in OUT/progress.jsonl; --resume gives identical predictions",
     "test": "tests/test_eval.py::test_eval_resume_after_interrupt_gives_identical_results"},
    {"fault": "the llama-server or vLLM server lost mid-eval", "command": "eval",
     "what": "the eval stops in one line naming the finished chunks kept in OUT/progress.jsonl; --resume "
             "continues on a new server",
     "test": "tests/test_eval_engines.py::test_lost_llama_server_stops_eval_keeps_progress"},
    {"fault": "a full disk while writing", "command": "fold",
     "what": "exit 2, one line (no space left on device); the partial output removed",
     "test": "tests/test_bad_input.py::test_disk_full_during_export_removes_partial_output"},
    {"fault": "vectors in float16 or bfloat16 (safetensors, control-vector GGUF)", "command": "fold",
     "what": "accepted, converted to float32: the fold equals the fold of the float32 values",
     "test": "tests/test_bad_input.py::test_half_precision_vectors_are_converted"},
    {"fault": "a direction stored as a matrix", "command": "fold",
     "what": "[1, N] and [N, 1] read as the vector; any other 2-D tensor refused in one line, exit 2, nothing "
             "written",
     "test": "tests/test_bad_input.py::test_matrix_shaped_directions"},
    {"fault": "two tensors for one layer (direction.1 and direction.01), a negative layer", "command": "fold",
     "what": "refused in one line naming both tensors (or the negative layer), exit 2, nothing written",
     "test": "tests/test_bad_input.py::test_duplicate_and_negative_layer_names_are_refused"},
    {"fault": "a control vector whose controlvector.layer_count exceeds the target's layers", "command": "fold",
     "what": "refused in one line, exit 2, nothing written (one that steers a layer the target lacks too)",
     "test": "tests/test_bad_input.py::test_control_vector_made_for_another_layer_count_is_refused"},
    {"fault": "a control vector's layers selected (--layers) for a deeper target", "command": "fold",
     "what": "accepted: the selection keeps the vectors' unknown layer count, so they fit the target",
     "test": "tests/test_bad_input.py::test_selected_layers_of_a_control_vector_fit_a_deeper_model"},
    {"fault": "a checkpoint with both safetensors and a pickled .bin", "command": "fold, key",
     "what": "the safetensors are used; the pickle is never loaded and not copied into the output",
     "test": "tests/test_bad_input.py::test_checkpoint_with_safetensors_and_a_pickle_uses_the_safetensors"},
    {"fault": "a shard index naming a missing shard", "command": "fold, key",
     "what": "refused in one line naming the shard, exit 2, nothing written",
     "test": "tests/test_bad_input.py::test_index_naming_a_missing_shard_is_refused"},
    {"fault": "rope scaling a Llama relabel cannot represent (qwen2, mistral)", "command": "fold",
     "what": "refused in one line naming the rope type, with or without --no-verify, exit 2, nothing written; "
             "a rope type Llama computes (yarn) folds and verifies",
     "test": "tests/test_bad_input.py::test_rope_scaling_the_relabel_cannot_represent_is_refused"},
    {"fault": "an output path that is a symbolic link into the source model", "command": "fold, eval, gguf",
     "what": "refused in one line, exit 2, before any work; nothing written into the model",
     "test": "tests/test_bad_input.py::test_output_symlink_into_the_source_model_is_refused"},
    {"fault": "a folder output that is a dangling symbolic link", "command": "fold",
     "what": "refused in one line, exit 2, before any work (it failed with exit 1 after the work)",
     "test": "tests/test_bad_input.py::test_output_symlink_into_the_source_model_is_refused"},
    {"fault": "random, damaged or malformed vectors files and recipes", "command": "every reader",
     "what": "a valid object or one line, exit 2; never another exception",
     "test": "tests/test_properties.py::test_vectors_reader_valid_or_refused"},
]


def signal_rows() -> list[dict]:
    """SIGNALS as FAULTS rows (scripts/render_docs.py renders the same)."""
    return [{"fault": f"{case['signal']} mid-work", "command": case["command"], "what": case["what"],
             "test": f"tests/test_faults.py::test_a_signal_stops_the_command_cleanly[{case['command']}-{case['signal']}]"}
            for case in SIGNALS]


# -- the child process ------------------------------------------------------------------------------

# UX_PAUSE="module:attr.path before|after N" wraps that function to stop before (or after) its Nth call
# until the file UX_GO exists (at most two minutes); a signal arrives meanwhile. SIGINT and SIGTERM get
# their default disposition first, as a foreground start has them: a background job of a
# non-interactive shell (`make test &`, nohup) inherits SIGINT ignored.
DRIVER = """
import importlib, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
spec = os.environ.get("UX_PAUSE")
if spec:
    target, when, n = spec.split()
    module, attr = target.split(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    real, calls = getattr(owner, name), []

    def pause():
        print("PAUSED", flush=True)
        go, deadline = os.environ.get("UX_GO"), time.time() + 120
        while time.time() < deadline and not (go and os.path.exists(go)):
            time.sleep(0.05)

    def wrapped(*args, **kwargs):
        calls.append(1)
        if when == "before" and len(calls) == int(n):
            pause()
        result = real(*args, **kwargs)
        if when == "after" and len(calls) == int(n):
            pause()
        return result

    setattr(owner, name, wrapped)
from unlock_export.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start(args, pause=None, go=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UX_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if pause:
        env["UX_PAUSE"] = pause
    if go:
        env["UX_GO"] = str(go)
    return subprocess.Popen([sys.executable, "-c", DRIVER, "--quiet", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_paused(proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.time()))
        if not ready:
            break
        line = proc.stdout.readline()
        if "PAUSED" in line:
            return
        if not line:
            break
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"the command never reached its pause point (exit {proc.returncode}): {err[-3000:]}")


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def err_lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


# -- the commands, each stopped at a point inside its work --------------------------------------------

def _vectors(tmp_path, hidden=64, layers=(1, 2, 3)):
    import torch

    from unlock_export.method.vectors import SteeringVectors

    g = torch.Generator().manual_seed(0)
    return SteeringVectors({i: torch.randn(hidden, generator=g) for i in layers}, 4, hidden,
                           model_hint="llama").save(tmp_path / "v.safetensors")


def _math_set(tmp_path, n=20):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {a} plus {a + 1}?", "answer": f"#### {2 * a + 1}"})
                            + "\n" for a in range(n)))
    return path


def setup_command(command, tmp_path, tiny_model_dir, tiny_recipe) -> dict:
    """args, the pause point, the output, and (run, eval) how the kept progress looks."""
    outs = tmp_path / "outs"
    outs.mkdir()
    if command == "fold":
        out = outs / "out"
        return {"args": ["fold", tiny_model_dir("llama"), "--vectors", _vectors(tmp_path), "-o", out, "--no-verify"],
                "pause": "unlock_export.models.checkpoint:_place after 1", "out": out}
    if command == "run":
        recipe, _ = tiny_recipe
        out = outs / "out"
        # 4 batches per capture: stopped before the locked capture's third, two are finished
        return {"args": ["run", recipe, out], "pause": "unlock_export.method.capture:tokenize before 3", "out": out}
    if command == "eval":
        out = outs / "out"
        # evaluate fsyncs progress.jsonl after each chunk of 16 questions: stopped after the first of two
        return {"args": ["eval", tiny_model_dir("llama"), "--data", _math_set(tmp_path), "--max-new-tokens", "4",
                         "--batch-size", "4", "-o", out], "pause": "os:fsync after 1", "out": out}
    if command == "gguf":
        from test_gguf_export import _fake_qwen2_gguf

        from unlock_export.cli import main

        model_dir = tiny_model_dir("qwen2")
        base = tmp_path / "base.gguf"
        _fake_qwen2_gguf(base, json.loads((model_dir / "config.json").read_text()))
        folded = tmp_path / "folded"
        assert main(["--quiet", "fold", str(model_dir), "--vectors", str(_vectors(tmp_path)), "--no-verify",
                     "-o", str(folded)]) == 0
        out = outs / "out.gguf"
        return {"args": ["gguf", folded, "--base", base, "-o", out],
                "pause": "unlock_export.export.gguf:_write_patched after 1", "out": out}
    raise ValueError(command)


@pytest.mark.parametrize("case", SIGNALS, ids=lambda c: f"{c['command']}-{c['signal']}")
def test_a_signal_stops_the_command_cleanly(case, tmp_path, tiny_model_dir, tiny_recipe, capsys):
    from unlock_export.cli import main

    command, sig = case["command"], getattr(signal, case["signal"])
    setup = setup_command(command, tmp_path, tiny_model_dir, tiny_recipe)
    out = setup["out"]
    proc = start(setup["args"], setup["pause"])
    wait_paused(proc)
    sent = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert time.time() - sent < 10, "the command took more than a few seconds to stop"
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    what = "terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted"
    lines = err_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {what}") and "Traceback" not in err, err
    if command == "run":
        kept = out.parent / f".{out.name}.partial"
        assert f"progress kept in '{kept}'" in lines[0] and "--resume" in lines[0], lines[0]
        assert not out.exists() and leftovers(out) == [kept.name]
        assert list(kept.glob("capture-*.safetensors"))  # the two finished batches
        assert main(["--quiet", "run", *map(str, setup["args"][1:]), "--resume"]) == 0, capsys.readouterr().err
        assert (out / "vectors.safetensors").is_file() and leftovers(out) == []
    elif command == "eval":
        progress = out / "progress.jsonl"
        assert f"progress kept in '{progress}'" in lines[0] and "--resume" in lines[0], lines[0]
        assert sorted(p.name for p in out.iterdir()) == ["progress.jsonl"] and leftovers(out) == []
        assert len(progress.read_text().splitlines()) == 2  # the header and the first chunk
        first = json.loads(progress.read_text().splitlines()[1])["seconds"]  # the chunk's generation time
        assert main(["--quiet", *map(str, setup["args"]), "--resume"]) == 0, capsys.readouterr().err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["n"] == 20 and summary["resumed_from"] == 16 and not progress.exists()
        # this run's wall time, and the generation time of every answer: the kept chunk's and this run's
        assert first >= 0 and summary["generation_s"] >= round(first, 1) and summary["wall_s"] >= 0
    else:
        assert lines[0] == f"error: {what}; partial outputs were removed"
        assert not out.exists() and leftovers(out) == []


def test_the_next_run_removes_what_a_killed_one_left(tmp_path, tiny_model_dir, tiny_recipe):
    setup = setup_command("fold", tmp_path, tiny_model_dir, tiny_recipe)
    out = setup["out"]
    proc = start(setup["args"], setup["pause"])
    wait_paused(proc)
    proc.kill()
    proc.communicate(timeout=30)
    left = leftovers(out)
    assert f".{out.name}.partial-{proc.pid}-" in " ".join(left) and f".{out.name}.src-{proc.pid}-" in " ".join(left)
    assert not out.exists()
    again = start(setup["args"])  # the same command, run as the user would
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    stale = [name for name in left if not name.endswith(".lock")]
    lines = err_lines(err)
    assert len(lines) == len(stale), lines
    for name, line in zip(stale, lines):
        assert f"removed {out.parent / name}" in line and f"pid {proc.pid}, no longer running" in line, line
    assert leftovers(out) == [] and (out / "unlock.json").is_file()


def test_a_killed_run_resumes_after_its_stale_staging_folder_is_removed(tmp_path, tiny_recipe, capsys, caplog,
                                                                         monkeypatch):
    import torch
    from safetensors.torch import load_file

    import unlock_export.method.capture as capture_mod
    from unlock_export.cli import main

    recipe, _ = tiny_recipe
    out = tmp_path / "outs" / "out"
    out.parent.mkdir()
    # killed in the unlocked capture, after the locked one (4 batches) finished and was saved
    proc = start(["run", recipe, out], "unlock_export.method.capture:tokenize before 6")
    wait_paused(proc)
    proc.kill()
    proc.communicate(timeout=30)
    kept = out.parent / f".{out.name}.partial"
    assert any(name.startswith(f".{out.name}.partial-{proc.pid}-") for name in leftovers(out))
    assert len(list(kept.glob("capture-*.safetensors"))) == 1
    real, calls = capture_mod.tokenize, []
    monkeypatch.setattr(capture_mod, "tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["--quiet", "run", str(recipe), str(tmp_path / "whole")]) == 0
    fresh, calls[:] = len(calls), []
    caplog.clear()
    with caplog.at_level("WARNING", logger="unlock_export"):
        assert main(["--quiet", "run", str(recipe), str(out), "--resume"]) == 0, capsys.readouterr().err
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and f"pid {proc.pid}, no longer running" in said[0], said
    assert said[0].startswith(f"removed {out.parent / f'.{out.name}.partial-{proc.pid}-'}")
    assert len(calls) == fresh - 4  # the locked capture came from the kept progress
    assert leftovers(out) == []
    for name in ("key.safetensors", "map.safetensors", "vectors.safetensors"):
        got, whole = load_file(out / name), load_file(tmp_path / "whole" / name)
        assert got.keys() == whole.keys() and all(torch.equal(got[k], whole[k]) for k in whole), name


@pytest.mark.parametrize("command", ["fold", "eval"])
def test_a_second_writer_of_one_output_is_refused(command, tmp_path, tiny_model_dir, tiny_recipe):
    setup = setup_command(command, tmp_path, tiny_model_dir, tiny_recipe)
    out, go = setup["out"], tmp_path / "go"
    first = start(setup["args"], setup["pause"], go=go)
    try:
        wait_paused(first)
        second = start([*setup["args"], "--overwrite"])
        _, err = second.communicate(timeout=120)
        lines = err_lines(err)
        assert second.returncode == 2, err
        assert len(lines) == 1 and lines[0] == (f"error: another unlock-export (pid {first.pid}) is writing '{out}': "
                                                "wait for it to finish, or choose another output"), lines
    finally:
        go.touch()
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert leftovers(out) == []
    if command == "fold":
        from unlock_export.models.checkpoint import Checkpoint

        assert json.loads((out / "unlock.json").read_text())["layers"] == [1, 2, 3]
        assert Checkpoint(out).has("model.layers.1.mlp.down_proj.bias")  # every shard whole and indexed
    else:
        summary = json.loads((out / "summary.json").read_text())
        rows = (out / "predictions.jsonl").read_text().splitlines()
        assert summary["n"] == 20 and len(rows) == 20 and summary["resumed_from"] == 0
        assert [json.loads(r)["index"] for r in rows] == list(range(20))
        assert not (out / "progress.jsonl").exists()


# -- the table itself --------------------------------------------------------------------------------

def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_test_the_table_names_exists():
    rows = FAULTS + signal_rows()
    missing = []
    for row in rows:
        if row.get("pending"):
            continue
        file, _, name = row["test"].partition("::")
        path = ROOT / file
        if not path.is_file() or name.split("[")[0] not in _functions(path):
            missing.append(row["test"])
    assert not missing, f"FAULTS names tests that do not exist: {missing}"
    assert all(set(row) >= {"fault", "command", "what", "test"} for row in rows)


def test_the_table_is_literal_for_the_renderer():
    """scripts/render_docs.py reads SIGNALS and FAULTS with ast.literal_eval, without importing this file,
    and renders the rows this file's tests are parametrised by."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts" / "render_docs.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert render.fault_rows() == signal_rows() + FAULTS
    text = render.render_faults()
    for row in signal_rows() + FAULTS:
        assert f"`{row['test']}`" in text
