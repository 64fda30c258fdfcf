"""lm-evaluation-harness interop: score the additive form in `lm_eval` without folding, on the
packaged questions, with `eval`'s prompt and scoring.

Two artifacts, neither needs lm-eval to write it:

- `write_steer_config`: the config file of lm-eval's `steered` model type (lm-eval 0.4.13,
  `lm_eval/models/hf_steered.py`): a `torch.save`d dict `{hookpoint: {"steering_vector",
  "steering_coefficient", "action": "add", "bias": None, "head_index": None}}`. lm-eval hooks every
  module of `model.base_model.named_modules()` whose name is a hookpoint and adds
  `steering_vector * steering_coefficient` to its output (the first item of a tuple output) at every
  position, which is `additive_steering`: the `layer_output` site is the decoder layer
  (`layers.N` for Llama-like models), `post_attention` the attention output projection
  (`layers.N.self_attn.o_proj`). The scale is baked into the vector in float32 (coefficient 1.0),
  so lm-eval casts the same offset to the model's dtype as the hooks do.
- `write_task`: a task folder for `lm_eval --include_path DIR`: a YAML and a two-line `utils.py`
  whose `!function`s (`load_docs`, `process_results`) live here. The questions come from the package
  (`builtin:gsm8k-dev`) or a JSONL file, read by `eval`'s own reader, so nothing is downloaded; the
  prompt is `eval`'s template, generation greedy and cut at `eval`'s stop strings, and
  `exact_match` is `eval`'s answer extraction compared with the gold answer as exact fractions.

The packaged folder `unlock_export/data/lm_eval` is `write_task`'s output with its defaults.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import torch

from .._io import atomic_path, atomic_write_text, refuse_existing, staging_dir
from ..errors import UserError

LM_EVAL_VERSION = "0.4.13"
TASK_NAME = "unlock_gsm8k"
DEFAULT_DATA = "builtin:gsm8k-dev"
STEER_SUFFIXES = (".pt", ".pth")  # what lm-eval's `steered` model reads as a torch.save'd config
_TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

UTILS_PY = '''"""unlock-export's GSM8K task for lm-evaluation-harness (written by `unlock-export lm-eval-task`)."""

from unlock_export.evaluation.lmeval import load_docs, process_results  # noqa: F401
'''


def packaged_task_dir() -> Path:
    """The task folder shipped in the package (`write_task`'s defaults): `lm_eval --include_path` it."""
    return Path(str(resources.files("unlock_export") / "data" / "lm_eval"))


# -- the steered model's config -------------------------------------------------------------------

def _module_names(model_dir: str | Path, vectors, site: str) -> dict[int, str]:
    """The lm-eval hookpoint of each steered layer of the model in `model_dir`: the name, under
    `model.base_model`, of the module whose output `additive_steering` edits (the model is built on
    the meta device from its config.json, so nothing is loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.architectures import architecture_for, config_size

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"--model '{model_dir}' is not a model folder with a config.json: pass the local folder "
                        "lm-eval loads (pretrained=...), or leave --model out for the Llama layout")
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"transformers cannot build a causal LM from '{path}/config.json': "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    arch = architecture_for(model)
    vectors.check_fits(len(arch.decoder_layers(model)), int(config_size(model.config, "hidden")), f"'{model_dir}'")
    names = {id(module): name for name, module in model.base_model.named_modules()}
    out = {}
    for layer in vectors.layers:
        module = arch.site_module(model, layer, site)
        if id(module) not in names:
            raise UserError(f"the {site} module of layer {layer} is outside the base model of '{model_dir}', "
                            "where lm-eval looks for hookpoints")
        out[layer] = names[id(module)]
    return out


def _default_names(vectors, site: str) -> dict[int, str]:
    """Hookpoints from the registry entry of the vectors' model family (`model_hint`), the Llama
    layout (`layers.N`) for a family it does not know: the layer list's path without the base model's
    attribute (`model.layers` -> `layers`, GPT-2 `transformer.h` -> `h`)."""
    from ..models.architectures import architecture_for_config

    arch = architecture_for_config({"model_type": vectors.model_hint or "llama"})
    layers = arch.layers_path.partition(".")[2] or arch.layers_path
    suffix = "" if site == "layer_output" else "." + arch.attn_out
    return {layer: f"{layers}.{layer}{suffix}" for layer in vectors.layers}


def hookpoints(vectors, model: str | Path | None = None) -> dict[int, str]:
    """{layer: lm-eval hookpoint} for the vectors' site: read off the model folder when given (its
    family's registry entry, checked to fit the vectors), else the Llama layout."""
    if not vectors.directions:
        raise UserError("the vectors file holds no vectors")
    if model is not None:
        return _module_names(model, vectors, vectors.site)
    return _default_names(vectors, vectors.site)


def steer_config(vectors, scale: float = 1.0, model: str | Path | None = None) -> dict[str, dict]:
    """The `steered` model's config: one `add` entry per steered layer, `scale * direction` in float32."""
    names = hookpoints(vectors, model)
    return {names[layer]: {"steering_vector": (vectors.directions[layer].float() * float(scale)).contiguous(),
                           "steering_coefficient": 1.0, "action": "add", "bias": None, "head_index": None}
            for layer in vectors.layers}


def write_steer_config(vectors, output: str | Path, scale: float = 1.0, model: str | Path | None = None,
                       overwrite: bool = False) -> dict:
    """Write the `steered` config to `output` (a .pt file, atomically); returns what was written."""
    output = Path(output)
    if output.suffix not in STEER_SUFFIXES:
        raise UserError(f"lm-eval reads a steered config from a .pt or .pth file, not '{output.name}': "
                        "name the output steer.pt")
    refuse_existing(output, overwrite)
    config = steer_config(vectors, scale, model)
    with atomic_path(output) as tmp:
        torch.save(config, tmp)
    return {"output": str(output), "lm_eval": LM_EVAL_VERSION, "model_type": "steered", "action": "add",
            "site": vectors.site, "scale": float(scale), "layers": vectors.layers, "hookpoints": list(config),
            "layout": "model" if model is not None else "default", "model": str(model) if model else None}


# -- the task -----------------------------------------------------------------------------------

def task_yaml(task: str = TASK_NAME, data: str = DEFAULT_DATA, offset: int = 0, template: str = "direct",
              max_new_tokens: int = 256, answers: str = "gsm8k") -> str:
    """The task's YAML text (JSON strings are YAML strings, so every value is written with json.dumps);
    `answers`: how they are scored, an evaluation.tasks name (gsm8k, math)."""
    from .engines import STOP

    def q(value) -> str:
        return json.dumps(value)

    until = "\n".join(f"    - {q(s)}" for s in STOP)
    return f"""# {data} for lm-evaluation-harness {LM_EVAL_VERSION} with `unlock-export eval`'s prompt and scoring
# ({answers}), written by `unlock-export lm-eval-task`. The questions are read by unlock_export (installed
# beside lm_eval): nothing is downloaded.
#   lm_eval --model hf --model_args pretrained=MODEL --include_path THIS_FOLDER --tasks {task}
task: {q(task)}
output_type: generate_until
custom_dataset: !function utils.load_docs
dataset_kwargs:
  data: {q(data)}
  offset: {int(offset)}
  template: {q(template)}
  answers: {q(answers)}
test_split: test
num_fewshot: 0
doc_to_text: prompt
doc_to_target: gold
process_results: !function utils.process_results
generation_kwargs:
  until:
{until}
  do_sample: false
  max_gen_toks: {int(max_new_tokens)}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(output: str | Path, data: str = DEFAULT_DATA, offset: int = 0, template: str | None = None,
               max_new_tokens: int = 256, task: str = TASK_NAME, overwrite: bool = False,
               answers: str | None = None) -> dict:
    """Write the task folder (`{task}.yaml`, `utils.py`) to `output`, atomically; returns what it holds.
    `answers` (an evaluation.tasks name; default the data set's own) says how answers are scored, and
    `template` defaults to its template."""
    from ..prompts import is_builtin, template_text
    from .run import load_items
    from .tasks import task_for

    kind = task_for(data, answers)
    template = template or kind.template

    output = Path(output)
    if not _TASK_NAME.match(task):
        raise UserError(f"task name '{task}' must be letters, digits, '_', '.' or '-'")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if offset < 0:
        raise UserError("--offset must be 0 or more")
    template_text(template)
    if not is_builtin(data):
        data = str(Path(data).expanduser().resolve())  # lm_eval may run from another folder
    items = load_items(data, offset=offset, task=kind.name)  # every line checked now, not when lm_eval runs
    refuse_existing(output, overwrite)
    with staging_dir(output, overwrite=overwrite) as work:
        atomic_write_text(work / f"{task}.yaml", task_yaml(task, data, offset, template, max_new_tokens, kind.name))
        atomic_write_text(work / "utils.py", UTILS_PY)
    return {"output": str(output), "task": task, "data": data, "offset": offset, "questions": len(items),
            "template": template, "answers": kind.name, "max_new_tokens": max_new_tokens, "lm_eval": LM_EVAL_VERSION}


def load_docs(data: str = DEFAULT_DATA, offset: int = 0, template: str | None = None, answers: str | None = None,
              **_metadata):
    """The task's `custom_dataset`: {"test": one row per question} (lm-eval passes its task metadata,
    the model arguments included, as keywords too: they are ignored). `answers`: how they are scored
    (an evaluation.tasks name; default the data set's own)."""
    import datasets

    from .run import load_items, render_prompts
    from .tasks import task_for

    kind = task_for(data, answers)
    items = load_items(data, offset=int(offset), task=kind.name)
    texts = render_prompts(items, template or kind.template)
    rows = [{"index": item.index, "question": item.question, "gold": str(item.gold), "prompt": text,
             "answers": kind.name} for item, text in zip(items, texts)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """`exact_match`: `eval`'s scoring of the answer (gsm8k: the extracted number equals the gold answer
    as exact fractions; math: math-verify's equivalence), as the doc's `answers` say."""
    from .engines import STOP
    from .tasks import task_for

    text = results[0]
    for stop in STOP:  # lm-eval already cut there (`until`): as `eval` does, in case a config drops it
        text = text.split(stop)[0]
    kind = task_for("", doc.get("answers"))
    return {"exact_match": float(kind.score(text, kind.read_gold(doc["gold"]))[1])}
