"""What a fold writes, as plug-ins: one module per export form, one line per form in FORMS, and one
export skeleton every form shares (`export`).

bias        a standalone checkpoint whose carrier biases hold the offsets (bias)
adapter     a PEFT BEFT adapter: one bias vector per steered module (adapter)
lora        a PEFT LoRA with lora_bias: B = 0, the offset in lora_B's bias (lora)
gated-lora  the paper form as weights: a plain LoRA whose label-free gates open at the last prompt
            token, or merged into a checkpoint (gated_lora)

A form module defines FORM, an object with
  name, summary       its choice (`fold --mode NAME`, recipe `fold.mode`) and a line of help
  default_rank        the rank it takes when none is given, or None when it takes no rank
  merges              whether it can be merged into a standalone checkpoint instead (`--merge`)
  fits_gates          whether its edit is fitted on the loaded target first (the gated edit's GateFit)
  peft_type(merge)    the PEFT adapter type it writes, or None for a standalone checkpoint
  carrier(arch, config, site)  the module of each steered layer it writes to (refusing what it cannot)
  write(job)          the files of the export into job.work, returning a Written
  reference(export_dir, info)  the hook edit a written export must equal (None: the additive hooks at its
                      scale), for `verify`
  card(result, target, context) -> CardText: what the card says the export is, extra table rows, a note, and
                      how to load and serve it
The skeleton does everything else the same way for every form: the target's files (GGUFs dequantized
once), the output-path refusal, the precision, a staging folder renamed into place only after the
export was reloaded by the stock library and verified against the hooks, and the card and unlock.json.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..._io import owned_prefix, staging_dir
from ...errors import ExportFailure, UserError
from ...registry import lookup

if TYPE_CHECKING:  # the registry is read by the CLI and the recipe schema, which load no torch
    import torch

    from ...method.vectors import SteeringVectors
    from ...models.checkpoint import Checkpoint
    from ..base import FoldResult

# name -> "module:attribute" of its plug-in (modules relative to this package), or the plug-in itself
FORMS: dict[str, Any] = {
    "bias": ".bias:FORM",
    "adapter": ".adapter:FORM",
    "lora": ".lora:FORM",
    "gated-lora": ".gated_lora:FORM",
}


@dataclasses.dataclass
class ExportJob:
    """What a form's `write` works from: the target's checkpoint and architecture, the staging folder,
    the (checked) vectors, strength and rank, the carrier module and the precision of the export."""

    target: str
    ckpt: Checkpoint
    arch: Any
    source_kind: str
    work: Path
    vectors: SteeringVectors
    scale: float
    rank: int | None
    carrier: str
    dtype: torch.dtype
    link: bool
    progress: bool
    merge: bool = False
    fit: Any = None  # the gated edit's method.gate.GateFit (gated-lora)


@dataclasses.dataclass
class Written:
    """What a form wrote: the exported model type (a relabel), the shards of a checkpoint, the offsets
    as stored (what verification checks beside the requested ones), the hook edit the export must equal
    (None: the additive form at the job's scale) and what the card records."""

    exported_type: str
    shards: dict = dataclasses.field(default_factory=dict)
    stored: SteeringVectors | None = None
    edit: Callable | None = None
    card_context: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CardText:
    """The form's part of the model card."""

    what: str  # what the export carries, after "as"
    load: str  # the card's Use section
    rows: str = ""  # extra table rows
    note: str = ""


class ExportForm(Protocol):
    name: str
    summary: str
    default_rank: int | None
    merges: bool
    fits_gates: bool

    def peft_type(self, merge: bool) -> str | None: ...

    def carrier(self, arch, config: dict, site: str) -> str: ...

    def write(self, job: ExportJob) -> Written: ...

    def reference(self, export_dir: Path, info: dict) -> Callable | None: ...

    def card(self, result: FoldResult, target: str, context: dict) -> CardText: ...


OFFSET_NOTE = ("Note: the offset applies at every position, prompt and generated tokens alike. That is a different\n"
               "intervention from the paper's own prefill-only, last-token edit; the scale was chosen for this form.")

CHECKPOINT_LOAD = ("```python\nfrom transformers import AutoModelForCausalLM\n"
                   "model = AutoModelForCausalLM.from_pretrained(\"PATH_TO_THIS_FOLDER\")  # no trust_remote_code, "
                   "no hooks\n```")


def offset_what(result: FoldResult, carried_as: str) -> str:
    """The card's "as ..." for a constant offset carried by `carried_as` of each steered layer's carrier."""
    where = " after the attention block" if result.site == "post_attention" else " at the output"
    return (f"a constant offset added to the residual stream{where}\n"
            f"of each steered decoder layer, as {carried_as} of `{result.carrier}`.")


def peft_load(base_id: str) -> str:
    """The card's snippet loading a PEFT adapter on its base model."""
    return ("```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
            f"base = AutoModelForCausalLM.from_pretrained(\"{base_id}\")\n"
            "model = PeftModel.from_pretrained(base, \"PATH_TO_THIS_FOLDER\")\n```")


BIAS_ADAPTER_SERVING = ("`model.merge_and_unload()` works only where the steered module already has a bias of its own "
            "(GPT-NeoX, GPT-2); elsewhere PEFT refuses to merge. vLLM and llama.cpp do not load bias adapters: "
            "serve the folded checkpoint (`unlock-export fold --mode bias`) with vLLM or transformers, or the "
            "control vector (`unlock-export cvec`) with llama.cpp.")


class OffsetForm:
    """What the forms carrying a constant offset per steered layer share (bias, adapter, lora): no gates,
    no merge, the additive hooks as their reference, and their card; `peft` is the PEFT adapter type a
    form writes (None: a checkpoint) and `loads_as` what the card calls the adapter."""

    default_rank: int | None = None
    merges = False
    fits_gates = False
    peft: str | None = None
    loads_as = ""

    def peft_type(self, merge: bool) -> str | None:
        return self.peft

    def carrier(self, arch, config: dict, site: str) -> str:
        return arch.adapter_carrier(site)

    def reference(self, export_dir: Path, info: dict):
        return None  # the additive hooks at the export's scale

    def card(self, result: FoldResult, target: str, context: dict) -> CardText:
        if self.peft is None:
            return CardText(offset_what(result, "the bias"), CHECKPOINT_LOAD, note=OFFSET_NOTE)
        from ..card import base_model_id

        load = (f"This is {self.loads_as}. It loads with PEFT on top of the base model:\n\n"
                f"{peft_load(base_model_id(target))}\n\n{BIAS_ADAPTER_SERVING}")
        return CardText(offset_what(result, "a bias vector the adapter adds to the output"), load, note=OFFSET_NOTE)


def form_names() -> tuple[str, ...]:
    return tuple(FORMS)


def form(name: str) -> ExportForm:
    """The plug-in registered as `name` (imported on first use)."""
    return lookup(FORMS, name, __name__, "mode")


def form_of_export(info: dict) -> ExportForm:
    """The form that wrote an export, from its unlock.json (a merged form's mode ends in -merged)."""
    name = str(info.get("mode", ""))
    return form(name[:-len("-merged")] if name.endswith("-merged") else name)


def forms_with(check: Callable[[ExportForm], bool]) -> list[str]:
    return [name for name in FORMS if check(form(name))]


def checked_rank(name: str, rank: int | None) -> int | None:
    """The rank a `name` export is written with: its default when none is given; refused where it takes none."""
    chosen = form(name)
    if chosen.default_rank is None:
        if rank is not None:
            having = " or ".join(f"--mode {n}" for n in forms_with(lambda f: f.default_rank is not None))
            raise UserError(f"--rank applies to {having} only (a {name} fold has no rank): drop it")
        return None
    rank = chosen.default_rank if rank is None else rank
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    return rank


def export(name: str, target: str, vectors: SteeringVectors, out: str | Path, *, scale: float = 1.0,
           rank: int | None = None, merge: bool = False, fit=None, link: bool = False, overwrite: bool = False,
           card_context: dict | None = None, verify: bool = True, tolerance: float = 1e-3,
           allow_pickle: bool = False, progress: bool = True, reference=None,
           dtype: str | torch.dtype | None = "auto") -> FoldResult:
    """Write `target` with `scale * vectors` (or the gated edit `fit`) as form `name` into `out`, verified
    against the hooks before anything is in place; the export skeleton every form shares."""
    import torch

    from ...models.architectures import architecture_for_config
    from ...models.checkpoint import Checkpoint, check_output_path
    from .. import card
    from ..base import FoldResult, export_dtype, materialize
    from ..verify import verify_export

    chosen = form(name)
    rank = checked_rank(name, rank)
    if fit is not None:  # the gated edit: its own rank and multiplier
        rank, scale = fit.rank, fit.multiplier
    if merge and not chosen.merges:
        raise UserError(f"--merge applies to {' or '.join(f'--mode {n}' for n in forms_with(lambda f: f.merges))} "
                        f"only (a {name} fold {'is already a checkpoint' if chosen.peft_type(False) is None else 'cannot merge'})")
    checkpoint = chosen.peft_type(merge) is None
    if not checkpoint and dtype not in (None, "auto"):
        having = [f"--mode {n}" for n in forms_with(lambda f: f.peft_type(False) is None)]
        having += [f"--mode {n} --merge" for n in forms_with(lambda f: f.merges)]
        raise UserError(f"--dtype applies to {' or '.join(having)} only (a {name} fold is a float32 adapter beside "
                        "the base): drop it")
    if not math.isfinite(scale):
        raise UserError(f"--scale must be a finite number, got {scale}")
    out = Path(out)
    scratch = Path(tempfile.mkdtemp(prefix=owned_prefix(out, "src"), dir=out.parent if out.parent.exists() else None))
    try:
        source_dir, source = materialize(target, scratch, allow_pickle)
        check_output_path(out, source_dir if source.kind != "gguf" else Path(source.path) / source.gguf_file, overwrite)
        ckpt = Checkpoint(source_dir)
        vectors = vectors.for_model(ckpt.layer_count(), ckpt.hidden_size(), f"'{target}'")
        arch = architecture_for_config(ckpt.config)
        carrier = chosen.carrier(arch, ckpt.config, vectors.site)
        weights = export_dtype(ckpt, dtype) if checkpoint else torch.float32
        with staging_dir(out, overwrite) as work:
            job = ExportJob(target, ckpt, arch, source.kind, work, vectors, scale, rank, carrier, weights, link,
                            progress, merge, fit)
            written = chosen.write(job)
            verification = None
            if verify:
                try:
                    verification = verify_export(work, vectors, job.scale, base=str(source_dir), tolerance=tolerance,
                                                 reference=reference, dtype=weights, stored=written.stored,
                                                 edit=written.edit)
                except ExportFailure as exc:
                    raise ExportFailure(f"{exc}; no output was written")
            mode = name + ("-merged" if merge else "")
            result = FoldResult(out, mode, arch.model_type, written.exported_type, vectors.layers, job.scale,
                                vectors.site, carrier, written.shards, verification)
            context = {**(card_context or {}), **written.card_context}
            card.write(work, result, vectors, target=target, source_dir=source_dir, peft_type=chosen.peft_type(merge),
                       rank=rank, context=context, text=chosen.card(result, target, context))
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
