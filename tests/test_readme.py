"""The README's commands are true: each fenced shell line that needs no zoo model and no engine runs
as written, and the CLI quickstart runs line by line with tiny models in place of the zoo names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ENGINE = re.compile(r"llama-server|vllm |--engine llamacpp|llama-cli")
ZOO = re.compile(r"zoo:|\$[ST]\b|^unlock-export run recipes/|^S=")


def fenced(lang: str) -> list[list[str]]:
    """The README's ```lang blocks, as logical lines (backslash continuations joined)."""
    blocks = re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)
    return [[line for line in block.replace("\\\n", " ").splitlines() if line.strip()] for block in blocks]


def _env() -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}


def _bash(script: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_readme_reads_in_five_minutes():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    assert "shared/" not in README.read_text()


def test_every_fenced_line_that_needs_no_zoo_model_or_engine_runs(tmp_path):
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    ran, skipped = [], []
    for block in fenced("sh"):
        if any(line.startswith("S=zoo:") for line in block):
            continue  # the CLI quickstart: its lines build on each other (test_the_cli_quickstart_runs_...)
        for line in block:
            command = line.split("  #")[0].strip()
            if command.startswith("make "):
                target = command.split()[1]
                assert re.search(rf"^{re.escape(target)}:", (REPO / "Makefile").read_text(), re.M), command
                skipped.append(command)
            elif ZOO.search(command) or ENGINE.search(command):
                skipped.append(command)
            else:
                done = _bash(command, tmp_path)
                assert done.returncode == 0, (command, done.stderr[-800:])
                ran.append(command)
    assert any("--dry-run" in c for c in ran), ran  # the recipe's plan is among them
    assert skipped


def test_the_cli_quickstart_runs_with_tiny_models(tmp_path, tiny_model_dir):
    """The quickstart block line by line, the zoo names replaced by tiny models; the GGUF and llama.cpp
    lines need a GGUF target and an engine (the engine suite covers them)."""
    block = next(b for b in fenced("sh") if any(line.startswith("S=zoo:") for line in b))
    source, target = tiny_model_dir("llama"), tiny_model_dir("qwen2", hidden=48, layers=3)
    script = []
    for line in block:
        if line.startswith("S="):
            line = f"S={source}; T={target}"
        elif line.startswith("unlock-export gguf") or ENGINE.search(line):
            continue
        elif line.startswith("unlock-export"):
            line = line.replace("unlock-export", "unlock-export --quiet", 1) + " --device cpu --dtype float32" * (
                line.split()[1] in ("key", "align", "calibrate"))
        script.append(line)
    assert len(script) >= 6, script
    done = _bash("\n".join(script), tmp_path)
    assert done.returncode == 0, done.stderr[-1500:]
    for name in ("key.safetensors", "map.safetensors", "vectors.safetensors", "calibration.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "out" / "qwen1.5b-cot" / "unlock.json").is_file()


def test_the_python_quickstart_compiles():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    for code in blocks:
        compile(code, "README.md", "exec")


def _python_quickstart() -> str:
    return next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "ux." in b)


def _tiny(script: str, source: str, target: str) -> str:
    return (script.replace('"zoo:qwen2.5-coder-0.5b-instruct"', repr(source))
            .replace('"zoo:qwen2.5-coder-1.5b-instruct"', repr(target)))


def test_the_python_quickstart_runs_with_tiny_models(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The README's Python quickstart as written, on tiny models: key by prompt contrast, map, project,
    calibrate, fold (verified), a stock reload equal to the additive hooks within 1e-4."""
    monkeypatch.chdir(tmp_path)
    source, target = tiny_model_dir("llama"), tiny_model_dir("qwen2", hidden=48, layers=3)
    exec(compile(_tiny(_python_quickstart(), str(source), str(target)), "README.md", "exec"), {})
    verified, stock = map(float, capsys.readouterr().out.split())
    assert verified <= 1e-3 and stock <= 1e-4
    assert (tmp_path / "out" / "folded" / "unlock.json").is_file()


def test_the_python_quickstart_with_models_the_caller_loaded_loads_nothing(tmp_path, tiny_model_dir, monkeypatch,
                                                                           capsys):
    """The same script with (model, tokenizer) pairs the caller loaded: no stage loads a model again (the
    fold's check reloads only the export, with stock transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import unlock_export.models.loading as loading

    monkeypatch.chdir(tmp_path)
    pairs = {}
    for name, path in (("source", tiny_model_dir("llama")), ("target", tiny_model_dir("qwen2", hidden=48, layers=3))):
        pairs[name] = (AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail(f"a model was loaded again: {a}"))
    script = _tiny(_python_quickstart(), "SOURCE", "TARGET").replace("'SOURCE'", "pairs['source']").replace(
        "'TARGET'", "pairs['target']")
    script = script.replace("model = ux.load_model(target)", "model = target")
    script = script.replace("model.tokenizer(", "model[1](").replace("model.model(", "model[0](")
    exec(compile(script, "README.md", "exec"), {"pairs": pairs})
    verified, stock = map(float, capsys.readouterr().out.split())
    assert verified <= 1e-3 and stock <= 1e-4
