"""`push` against a local stand-in for the Hub (tests/hub_server.py) and `inspect` on every artifact."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from hub_server import FakeHub

from unlock_export.cli import main
from unlock_export.method.vectors import SteeringVectors
from unlock_export.models.loading import load

TOKEN = "hf_test_secret_token_0123456789"


def cli(capsys, *args):
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_dir):
    """A bias checkpoint, an adapter, a vectors file and a control-vector GGUF of a tiny qwen2."""
    from unlock_export.export.gguf import write_control_vector_gguf as write_control_vector

    root = tmp_path_factory.mktemp("push")
    src = tiny_model_dir("qwen2")
    lm = load(str(src), dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(0)
    vectors = SteeringVectors({L: torch.randn(lm.hidden_size, generator=g) for L in (1, 2)}, lm.n_layers,
                              lm.hidden_size, "layer_output", "qwen2", {"source": "test"})
    vec_path = vectors.save(root / "vectors.safetensors")
    write_control_vector(vectors, root / "steer.gguf")
    out = {"vectors": vec_path, "cvec": root / "steer.gguf"}
    for mode in ("bias", "adapter"):
        code = main(["--quiet", "fold", str(src), "--vectors", str(vec_path), "--mode", mode, "--scale", "2",
                     "-o", str(root / mode)])
        assert code == 0
        out[mode] = root / mode
    return out


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as constants

    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


def _front(card: bytes) -> dict:
    return yaml.safe_load(card.decode().split("---")[1])


def test_push_checkpoint_sends_every_file_with_card_metadata_and_auth(capsys, hub, artifacts):
    export = artifacts["bias"]
    code, out, err = cli(capsys, "--json", "push", export, "--repo-id", "me/tiny-unlock",
                         "--base-model", "Qwen/Qwen2.5-0.5B", "--message", "first export")
    assert code == 0, err
    report = json.loads(out)
    assert len(hub.commits) == 1 and hub.commits[0]["summary"] == "first export"
    files = hub.files("me/tiny-unlock")
    local = {p.name: p.read_bytes() for p in export.iterdir() if p.is_file()}
    assert set(files) == set(local)
    for name, data in local.items():
        if name != "README.md":
            assert files[name] == data, name
    front = _front(files["README.md"])
    assert front["base_model"] == "Qwen/Qwen2.5-0.5B" and front["library_name"] == "transformers"
    assert {"unlock-export", "steering"} <= set(front["tags"])
    auth = {r["authorization"] for r in hub.requests}
    assert auth == {f"Bearer {TOKEN}"}
    assert report["commit_url"].startswith(hub.endpoint) and report["kind"] == "checkpoint"
    # the token is never printed nor written into any pushed file
    assert TOKEN not in out + err and not any(TOKEN.encode() in data for data in files.values())


def test_push_adapter_is_marked_peft_and_private_branch(capsys, hub, artifacts):
    code, _, err = cli(capsys, "--quiet", "push", artifacts["adapter"], "--repo-id", "me/tiny-adapter",
                       "--private", "--revision", "exp1", "--base-model", "Qwen/Qwen2.5-0.5B")
    assert code == 0, err
    assert hub.repos["me/tiny-adapter"]["private"] is True
    assert hub.commits[-1]["revision"] == "exp1" and hub.files("me/tiny-adapter", "main") == {}
    files = hub.files("me/tiny-adapter", "exp1")
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    front = _front(files["README.md"])
    assert front["library_name"] == "peft" and front["base_model"] == "Qwen/Qwen2.5-0.5B"


@pytest.mark.parametrize("which,tag", [("vectors", "steering"), ("cvec", "control-vector")])
def test_push_single_file_gets_a_generated_card(capsys, hub, artifacts, which, tag):
    code, _, err = cli(capsys, "--quiet", "push", artifacts[which], "--repo-id", f"me/{which}",
                       "--base-model", "Qwen/Qwen2.5-0.5B")
    assert code == 0, err
    files = hub.files(f"me/{which}")
    assert files[artifacts[which].name] == artifacts[which].read_bytes()
    front = _front(files["README.md"])
    assert tag in front["tags"] and front["base_model"] == "Qwen/Qwen2.5-0.5B"


def test_failed_commit_reports_clearly_and_retry_makes_one_commit(capsys, hub, artifacts):
    hub.fail_commits = 1
    args = ("push", artifacts["bias"], "--repo-id", "me/retry", "--base-model", "Qwen/Qwen2.5-0.5B")
    code, out, err = cli(capsys, "--quiet", *args)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "HTTP 500" in lines[0] and "rerun the same command" in lines[0], err
    assert "Traceback" not in err and TOKEN not in err and hub.commits == []
    assert cli(capsys, "--quiet", *args)[0] == 0
    assert len(hub.commits) == 1
    # pushing the same files again changes nothing on the Hub: no second commit
    assert cli(capsys, "--quiet", *args)[0] == 0
    assert len(hub.commits) == 1


def test_dry_run_lists_paths_sizes_and_hashes_and_sends_nothing(capsys, hub, artifacts):
    export = artifacts["bias"]
    code, out, err = cli(capsys, "push", export, "--repo-id", "me/dry", "--base-model", "Qwen/Qwen2.5-0.5B",
                         "--dry-run")
    assert code == 0, err
    assert hub.requests == [] and hub.commits == []
    weights = next(p for p in export.iterdir() if p.suffix == ".safetensors")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    line = next(row for row in out.splitlines() if row.rstrip().endswith(weights.name))
    assert digest in line and f"{weights.stat().st_size:,}" in line
    assert out.splitlines()[0].startswith("would push checkpoint to me/dry@main")


@pytest.mark.parametrize("repo_id", ["no-namespace", "me/bad name", "me/../x", "me/a--b", "-me/x", "me/x.git", "a/b/c"])
def test_invalid_repo_id_is_refused(capsys, hub, artifacts, repo_id):
    code, _, err = cli(capsys, "push", artifacts["vectors"], "--repo-id", repo_id, "--dry-run")
    assert code == 2 and err.startswith("error: --repo-id") and len(err.strip().splitlines()) == 1, err
    assert hub.requests == []


def test_push_without_token_says_how_to_log_in(capsys, hub, artifacts, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    code, _, err = cli(capsys, "push", artifacts["vectors"], "--repo-id", "me/x")
    assert code == 2 and "HF_TOKEN" in err and "hf auth login" in err, err
    assert hub.requests == []


def test_checkpoint_without_base_model_needs_the_option(capsys, hub, artifacts, tmp_path):
    import shutil

    export = tmp_path / "export"
    shutil.copytree(artifacts["bias"], export)
    card = (export / "README.md").read_text()
    (export / "README.md").write_text(card.replace("base_model:", "not_base_model:"))
    code, _, err = cli(capsys, "push", export, "--repo-id", "me/x", "--dry-run")
    assert code == 2 and "--base-model" in err, err


def test_inspect_every_artifact(capsys, artifacts):
    vec = SteeringVectors.load(artifacts["vectors"])
    code, out, err = cli(capsys, "--json", "inspect", artifacts["vectors"])
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "steering vectors" and info["layers"] == "1-2" and info["site"] == "layer_output"
    assert info["norms"]["1"] == pytest.approx(vec.norms()[1], rel=1e-5)
    info = json.loads(cli(capsys, "--json", "inspect", artifacts["cvec"])[1])
    assert info["kind"] == "llama.cpp control vector" and info["layers"] == "1-2" and info["model_hint"] == "qwen2"
    assert info["norms"]["2"] == pytest.approx(vec.norms()[2], rel=1e-5)
    info = json.loads(cli(capsys, "--json", "inspect", artifacts["bias"])[1])
    assert info["kind"] == "checkpoint" and info["unlock"]["scale"] == 2 and info["unlock"]["layers"] == "1-2"
    info = json.loads(cli(capsys, "--json", "inspect", artifacts["adapter"])[1])
    assert info["kind"] == "PEFT adapter" and info["unlock"]["mode"] == "adapter"
    code, out, _ = cli(capsys, "inspect", artifacts["vectors"])
    assert code == 0 and "steering vectors" in out and "norms" in out


def test_inspect_refuses_foreign_files(capsys, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    code, _, err = cli(capsys, "inspect", other)
    assert code == 2 and "not an unlock-export key, map or vectors file" in err
    (tmp_path / "x.txt").write_text("hi")
    assert cli(capsys, "inspect", tmp_path / "x.txt")[0] == 2


def test_recipe_push_step(capsys, hub, tiny_recipe, tmp_path):
    path, recipe = tiny_recipe
    recipe["fold"] = {"mode": "bias", "scale": 0.5, "layers": "1-2"}
    recipe["diagnostics"] = {"enabled": False}
    recipe["push"] = {"repo_id": "me/from-recipe", "base_model": "Qwen/Qwen2.5-0.5B"}
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    code, _, err = cli(capsys, "--quiet", "run", path, out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["push"]["repo_id"] == "me/from-recipe" and len(hub.commits) == 1
    pushed = hub.files("me/from-recipe")
    assert pushed["unlock.json"] == (out / "model" / "unlock.json").read_bytes()
    # a failing push keeps the finished outputs and says how to push them
    hub.fail_commits = 1
    recipe["push"]["repo_id"] = "me/from-recipe-2"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = cli(capsys, "--quiet", "run", path, tmp_path / "out2")
    assert code == 1 and "unlock-export push" in err and (tmp_path / "out2" / "model" / "config.json").is_file(), err


def test_push_run_output_folder(capsys, hub, tiny_recipe, tmp_path):
    path, recipe = tiny_recipe
    recipe["fold"] = {"mode": "bias", "scale": 0.5, "layers": "1-2", "verify": False}
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert cli(capsys, "--quiet", "run", path, out)[0] == 0
    code, text, err = cli(capsys, "push", out, "--repo-id", "me/run", "--dry-run")
    assert code == 0, err
    assert text.splitlines()[0].startswith("would push recipe-output to me/run@main")
    listed = {line.split()[-1] for line in text.splitlines()[1:] if not line.endswith("(generated card)")}
    expected = {p.name for p in out.iterdir() if p.is_file()}
    assert listed == expected and {"key.safetensors", "map.safetensors", "vectors.safetensors"} <= listed
    assert hub.requests == []
    code, _, err = cli(capsys, "--quiet", "push", out, "--repo-id", "me/run", "--base-model", "Qwen/Qwen2.5-0.5B")
    assert code == 0, err
    pushed = hub.files("me/run")
    assert set(pushed) == expected | {"README.md"}  # the model/ export is a push of its own
    assert pushed["vectors.safetensors"] == (out / "vectors.safetensors").read_bytes()
    front = _front(pushed["README.md"])
    assert front["base_model"] == "Qwen/Qwen2.5-0.5B" and "steering" in front["tags"]
    assert b"unlock-export fold TARGET --vectors vectors.safetensors" in pushed["README.md"]


@pytest.mark.parametrize("push,match", [({"repo_id": "bad id"}, "--repo-id"),
                                        ({"repo_id": "me/x", "artifact": "model"}, "needs a fold step"),
                                        ({"repo_id": "me/x", "token": "abc"}, "unknown key 'push.token'")])
def test_recipe_push_step_is_validated(capsys, tiny_recipe, push, match):
    path, recipe = tiny_recipe
    recipe["push"] = push
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = cli(capsys, "run", path, path.parent / "never")
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (path.parent / "never").exists()
