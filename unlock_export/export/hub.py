"""Push an export to the Hugging Face Hub: one repo create, one commit.

What can be pushed: an exported folder (folded checkpoint or PEFT adapter, which already holds its
model card), a `run` output folder (key, map, vectors, summary, diagnostics; its `model/` export is
a separate push), or a single artifact file (a vectors/key/map safetensors file, a control-vector or
model GGUF); a model card is generated for the last two. The token comes from huggingface_hub's own
sources (`HF_TOKEN`, the login cache); it is never printed or written. `HF_ENDPOINT` is honoured.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import __version__
from ..errors import ExportFailure, UserError
from .card import front_matter

# What the Hub accepts: namespace/name, letters, digits, '-', '_', '.', no '--' or '..', <= 96 chars
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
# Never uploaded: our own temporary files, VCS and OS litter.
_SKIP_NAMES = {".git", ".DS_Store", "__pycache__", ".cache"}


@dataclass(frozen=True)
class UploadFile:
    path_in_repo: str
    local: Path | None  # None: generated content (the model card of a single-file push)
    size: int
    sha256: str
    content: bytes | None = None

    def as_dict(self) -> dict:
        return {"path": self.path_in_repo, "size": self.size, "sha256": self.sha256,
                "generated": self.local is None}


def validate_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id or "") or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        raise UserError(f"--repo-id '{repo_id}' is not a Hub repo id: use USER/NAME with letters, digits, "
                        "'-', '_' or '.' (no '--' or '..', at most 96 characters each)")
    return repo_id


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _card_front(text: str) -> dict:
    return front_matter(text)


def _with_front(text: str, updates: dict) -> str:
    """The card with its YAML front matter updated (added when missing)."""
    meta = {**_card_front(text), **updates}
    body = re.sub(r"^---\n.*?\n---\n?", "", text, count=1, flags=re.S)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body


def _artifact_kind(path: Path) -> str:
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return "adapter"
        if (path / "config.json").is_file():
            return "checkpoint"
        if (path / "summary.json").is_file() and (path / "vectors.safetensors").is_file():
            return "recipe-output"
        raise UserError(f"'{path}' is neither an exported checkpoint (config.json), an adapter "
                        "(adapter_config.json) nor a `run` output (summary.json, vectors.safetensors): "
                        "push one of those or a single artifact file")
    if path.suffix == ".gguf":
        from ..models.gguf_fields import read_fields

        name = read_fields(path, {"general.architecture"}).get("general.architecture", "")
        return "control-vector" if name == "controlvector" else "gguf"
    if path.suffix == ".safetensors":
        return "vectors"
    raise UserError(f"'{path}' is not something push knows: an export folder, a .safetensors or a .gguf file")


def _recipe_output_card(path: Path, base_model: str | None) -> str:
    """Card of a `run` output: what the steering vectors are for and how to apply them."""
    import json

    from ..method.vectors import SteeringVectors
    from .card import base_model_id

    summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    vectors = SteeringVectors.load(path / "vectors.safetensors")
    target = vectors.provenance.get("target", "")
    front = {"tags": ["unlock-export", "steering"], "base_model": base_model or base_model_id(target) or None}
    front = {k: v for k, v in front.items() if v}
    lines = [f"# {summary.get('recipe', path.name)}", "",
             f"UNLOCK steering vectors (arXiv 2604.06377) made by unlock-export {__version__}: the source's "
             f"key ({vectors.provenance.get('key_templates', '')}, {summary.get('n_prompts_key')} prompts) carried "
             f"into `{target}` through a rank-{summary.get('rank')} map "
             f"({summary.get('source_layers')} -> {summary.get('target_layers')} layers).", ""]
    if summary.get("diagnostics"):
        lines += [f"Diagnostics: {summary['diagnostics']}", ""]
    lines += ["## Use", "", "```sh",
              "unlock-export fold TARGET --vectors vectors.safetensors --scale S -o folded/   # a checkpoint",
              "unlock-export cvec --vectors vectors.safetensors --scale S --layers 1-N -o steer.gguf  # llama.cpp",
              "```", ""]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(lines)


def _single_file_card(path: Path, kind: str, base_model: str | None) -> str:
    front = {"tags": ["unlock-export", "steering"] + (["gguf", "control-vector"] if kind == "control-vector"
                                                        else ["gguf"] if kind == "gguf" else [])}
    if base_model:
        front["base_model"] = base_model
    use = {
        "control-vector": f"```sh\nllama-server -m TARGET.gguf --control-vector {path.name}\n```",
        "gguf": f"```sh\nllama-server -m {path.name}\n```",
        "vectors": f"```sh\nunlock-export fold TARGET --vectors {path.name} --scale S -o folded/\n```",
    }[kind]
    return ("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n"
            f"\n# {path.name}\n\nA {kind.replace('-', ' ')} file made by unlock-export {__version__} "
            "(UNLOCK capability transfer, arXiv 2604.06377).\n\n## Use\n\n" + use + "\n")


def plan_upload(path: str | Path, base_model: str | None = None) -> tuple[str, list[UploadFile]]:
    """(kind, files) that a push of PATH uploads; nothing is sent."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"'{path}' does not exist: pass an export folder or an artifact file")
    kind = _artifact_kind(path)
    files: list[UploadFile] = []
    if kind == "recipe-output":
        for local in sorted(p for p in path.iterdir() if p.is_file() and not p.is_symlink()):
            if local.name not in _SKIP_NAMES and not local.name.startswith("."):
                files.append(UploadFile(local.name, local, local.stat().st_size, _sha256(local)))
        content = _recipe_output_card(path, base_model).encode()
        files.append(UploadFile("README.md", None, len(content), hashlib.sha256(content).hexdigest(), content))
    elif path.is_dir():
        card_updates = {"library_name": "peft" if kind == "adapter" else "transformers"}
        if base_model:
            card_updates["base_model"] = base_model
        for local in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = local.relative_to(path)
            if any(part in _SKIP_NAMES or part.startswith(".tmp") for part in rel.parts) or local.is_symlink():
                continue
            if rel.as_posix() == "README.md":
                content = _with_front(local.read_text(encoding="utf-8"), card_updates).encode()
                files.append(UploadFile("README.md", None, len(content), hashlib.sha256(content).hexdigest(), content))
                continue
            files.append(UploadFile(rel.as_posix(), local, local.stat().st_size, _sha256(local)))
        if not any(f.path_in_repo == "README.md" for f in files):
            content = _with_front("", {**card_updates, "tags": ["unlock-export", "steering"]}).encode()
            files.append(UploadFile("README.md", None, len(content), hashlib.sha256(content).hexdigest(), content))
    else:
        files.append(UploadFile(path.name, path, path.stat().st_size, _sha256(path)))
        content = _single_file_card(path, kind, base_model).encode()
        files.append(UploadFile("README.md", None, len(content), hashlib.sha256(content).hexdigest(), content))
    front = _card_front((next(f for f in files if f.path_in_repo == "README.md").content or b"").decode())
    if kind in ("adapter", "checkpoint") and not front.get("base_model"):
        raise UserError(f"'{path}' has no base_model in its model card: pass --base-model ORG/NAME")
    return kind, files


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then rerun")
    return token


def push(path: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         base_model: str | None = None, message: str | None = None, dry_run: bool = False) -> dict:
    """Create the repo if needed and upload PATH in one commit. Returns what was (or would be) sent."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    validate_repo_id(repo_id)
    kind, files = plan_upload(path, base_model)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    report = {"repo_id": repo_id, "kind": kind, "revision": revision or "main", "private": private,
              "endpoint": endpoint or "https://huggingface.co", "dry_run": dry_run,
              "files": [f.as_dict() for f in files], "bytes": sum(f.size for f in files)}
    if dry_run:
        return report
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE is set: unset it to push (or use --dry-run)")
    api = HfApi(endpoint=endpoint, token=_token())
    message = message or f"Upload {kind} with unlock-export {__version__}"
    operations = [CommitOperationAdd(f.path_in_repo, f.content if f.local is None else str(f.local)) for f in files]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision,
                                 repo_type="model")
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", "?")
        raise ExportFailure(f"push to {repo_id} failed: the Hub answered HTTP {status} "
                            f"({_first_line(exc)}); the commit was not made, rerun the same command to retry") from exc
    except OSError as exc:
        raise ExportFailure(f"push to {repo_id} failed: {exc}; rerun the same command to retry") from exc
    report["commit_url"] = info.commit_url
    report["commit"] = info.oid
    return report


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def format_upload_plan(report: dict) -> str:
    lines = [f"{'would push' if report['dry_run'] else 'pushed'} {report['kind']} to {report['repo_id']}"
             f"@{report['revision']} ({report['endpoint']}): {len(report['files'])} files, {report['bytes']:,} bytes"]
    for f in report["files"]:
        lines.append(f"  {f['size']:>14,}  {f['sha256']}  {f['path']}{'  (generated card)' if f['generated'] else ''}")
    if report.get("commit_url"):
        lines.append(f"commit: {report['commit_url']}")
    return "\n".join(lines)

