"""The stages wired together over a ModelPool: key, map, projection. Used by the public API, the CLI
commands and recipes. Model arguments are specs or models the caller loaded (see models.pool)."""

from __future__ import annotations

import logging

import torch

from .. import prompts
from ..models import loading as models
from ..models.pool import ModelPool, model_label
from . import align, capture
from .key import MasterKey, aggregate_differences
from .vectors import SteeringVectors, parse_layers

log = logging.getLogger("unlock_export")


def prompt_texts(loaded, template: str, questions: list[str], chat: prompts.Chat | None = None,
                 spec: str = "the model") -> list[str]:
    """The questions under `template`, wrapped by the model's chat template when `chat` is given."""
    texts = prompts.apply_template(template, questions)
    return texts if chat is None else prompts.chat_texts(loaded.tokenizer, texts, chat, f"model '{spec}'")


def capture_states(pool: ModelPool, spec: str, template: str, questions: list[str], desc: str,
                   layers: list[int] | None = None, answers: list[str] | None = None,
                   chat: prompts.Chat | None = None) -> torch.Tensor:
    """The residual at the last prompt token; with `answers` (one text per question, appended to
    its prompt) the mean over the last prompt token and the answer's tokens after it. `chat`: the
    prompts wrapped by the model's chat template."""
    loaded = pool.get(spec)
    texts = prompt_texts(loaded, template, questions, chat, model_label(spec))
    return _read(pool, loaded, texts, answers, desc, layers)


def _read(pool: ModelPool, loaded, texts: list[str], answers: list[str] | None, desc: str,
          layers: list[int] | None = None) -> torch.Tensor:
    """capture at the last token of `texts`, or with `answers` over the last prompt token and the answer's."""
    tail = None
    if answers is not None:
        tok = loaded.tokenizer
        full = [t + a for t, a in zip(texts, answers)]
        # counted on this model's tokenizer: the tokens the answer adds, plus the last prompt token
        tail = [max(1, len(tok(f)["input_ids"]) - len(tok(t)["input_ids"]) + 1) for t, f in zip(texts, full)]
        texts = full
    return capture.capture(loaded, texts, layers=layers, position="last" if tail is None else "tail",
                           batch_size=pool.options.batch_size, max_length=pool.options.max_length,
                           progress=pool.progress, desc=desc, checkpoint_dir=pool.checkpoint_dir, tail_tokens=tail)


def answer_openings(pool: ModelPool, spec: str, template: str, questions: list[str], tokens: int,
                    chat: prompts.Chat | None = None) -> list[str]:
    """The first `tokens` tokens of each question's greedy answer under `template`, as text."""
    from .capture import resolve_batch_size
    from .generate import greedy

    loaded = pool.get(spec)
    texts = prompt_texts(loaded, template, questions, chat, model_label(spec))
    batch_size = resolve_batch_size(pool.options.batch_size, loaded, texts, pool.options.max_length, extra_tokens=tokens)
    return [loaded.tokenizer.decode(row) for row in greedy(loaded, texts, tokens, batch_size, keep_first=True)]


def compute_key(pool: ModelPool, locked: str, unlocked: str, locked_template: str, unlocked_template: str,
                questions: list[str], method: str = "mean", answer_tokens: int = 0,
                locked_chat: prompts.Chat | None = None,
                unlocked_chat: prompts.Chat | None = None) -> tuple[MasterKey, torch.Tensor | None]:
    """Master Key from locked/unlocked source variants. Also returns the locked states [S, N, d] at
    the last prompt token, for the map to reuse (None when the key read the answer instead).

    answer_tokens = 0 reads the last prompt token (the paper's key). answer_tokens = K > 0 reads
    the answer instead: the unlocked variant writes its greedy first K tokens, both variants are
    teacher-forced on that same opening after their own prompt, and each difference is the mean
    over the last prompt token and the K tokens after it: a direction present at every position of
    the answer's start, which is what a fold (a constant offset) applies.

    `locked_chat`, `unlocked_chat`: each variant's prompts wrapped by its model's chat template (a
    system text of its own each: a contrast by system prompt)."""
    from ..errors import UserError

    if locked == unlocked and locked_template == unlocked_template and locked_chat == unlocked_chat:
        raise UserError("locked and unlocked variants are identical: give two models, two templates, two system "
                        "texts, or more than one of these")
    if answer_tokens < 0:
        raise UserError(f"answer tokens must be 0 (the last prompt token) or more, got {answer_tokens}")
    answers = answer_openings(pool, unlocked, unlocked_template, questions, answer_tokens,
                              unlocked_chat) if answer_tokens else None
    unlocked_states = capture_states(pool, unlocked, unlocked_template, questions, "capture source (unlocked)",
                                     answers=answers, chat=unlocked_chat)
    locked_states = capture_states(pool, locked, locked_template, questions, "capture source (locked)",
                                   answers=answers, chat=locked_chat)
    provenance = {
        "locked_model": model_label(locked), "unlocked_model": model_label(unlocked),
        "locked_template": locked_template, "unlocked_template": unlocked_template,
        "method": method, "n_prompts": str(len(questions)), "answer_tokens": str(answer_tokens),
        "model_hint": pool.get(unlocked).model.config.model_type,
    }
    for side, chat in (("locked", locked_chat), ("unlocked", unlocked_chat)):
        if chat is not None:
            provenance[f"{side}_chat"] = chat.describe()
    key = MasterKey(aggregate_differences(locked_states, unlocked_states, method), provenance)
    return key, (None if answers else locked_states)


def compute_map(pool: ModelPool, source: str, target: str, source_template: str, target_template: str,
                questions: list[str], rank: int, chat: prompts.Chat | None = None,
                contrast: tuple[str, prompts.Chat | None] | None = None,
                contrast_pairs: list[prompts.Pair] | None = None) -> align.LowRankMap:
    """Low-rank map source -> target on paired prompts (a capture the pool's checkpoint folder holds
    already, such as the key's locked one, is read back rather than run again). `chat`: both models read
    the prompts through their own chat templates. `contrast` (a template and a chat wrapping, the key's other
    variant's format): the same questions in that format are paired too, in both models, so the map
    sees the variation the key is made of (reports/contrast-alignment.md: it then carries the key).
    `contrast_pairs` (a pairs key's own pairs): both sides of each pair, read at their last token, are
    paired too, in both models (through each one's chat template with `chat`)."""

    def paired_states(model: str, template: str, role: str) -> torch.Tensor:
        """[L, N, d] of `model` (`role`: source or target): the prompts, then their contrast, then the pairs."""
        parts = [capture_states(pool, model, template, questions, f"capture {role} (align)", chat=chat)]
        if contrast is not None:
            parts.append(capture_states(pool, model, contrast[0], questions, f"capture {role} (align, contrast)",
                                        chat=contrast[1]))
        if contrast_pairs:
            parts.append(pair_states(pool, model, contrast_pairs, chat, f"capture {role} (align, pairs)"))
        return torch.cat(parts, dim=1)

    source_states = paired_states(source, source_template, "source")
    target_loaded = pool.get(target)
    target_states = paired_states(target, target_template, "target")
    device = models.choose_device(pool.options.device)
    lrmap = align.fit(source_states, target_states, rank, device=device)
    lrmap.provenance.update({
        "source_model": model_label(source), "target_model": model_label(target),
        "source_template": source_template, "target_template": target_template,
        "target_model_type": target_loaded.model.config.model_type,
    })
    if chat is not None:
        lrmap.provenance["chat"] = chat.describe()
    if contrast is not None:
        lrmap.provenance["contrast"] = f"template {contrast[0]}" + (f", {contrast[1].describe()}" if contrast[1] else "")
    if contrast_pairs:
        lrmap.provenance["contrast_pairs"] = str(len(contrast_pairs))
    return lrmap


def pair_sides(loaded, pairs: list[prompts.Pair], chat: prompts.Chat | None, name: str
               ) -> tuple[list[str] | None, dict[str, list[str]]]:
    """(each pair's prompt as the model reads it, or None for pairs of two texts; {side: the full text of
    each pair's positive / negative side}), wrapped by the model's chat template when `chat` is given
    (the prompt, or each text, is the user's turn; completions follow the assistant's start)."""
    tok = loaded.tokenizer
    if pairs[0].prompt is not None:
        heads = [p.prompt for p in pairs]
        heads = heads if chat is None else prompts.chat_texts(tok, heads, chat, f"model '{name}'")
        return heads, {side: [h + getattr(p, side) for h, p in zip(heads, pairs)] for side in ("positive", "negative")}
    sides = {side: [getattr(p, side) for p in pairs] for side in ("positive", "negative")}
    if chat is not None:
        sides = {side: prompts.chat_texts(tok, texts, chat, f"model '{name}'") for side, texts in sides.items()}
    return None, sides


def pair_states(pool: ModelPool, spec: str, pairs: list[prompts.Pair], chat: prompts.Chat | None,
                desc: str) -> torch.Tensor:
    """The residual at the last token of both sides' full texts of each pair, on `spec`: the states
    a map pairs to see a pairs key's contrast ([layers, 2 x pairs, d], positives then negatives)."""
    loaded = pool.get(spec)
    _, sides = pair_sides(loaded, pairs, chat, model_label(spec))
    return _read(pool, loaded, sides["positive"] + sides["negative"], None, desc)


def compute_pair_key(pool: ModelPool, model: str, pairs: list[prompts.Pair], method: str = "mean",
                     chat: prompts.Chat | None = None, source_name: str = "") -> MasterKey:
    """The Master Key of contrastive pairs on one model: positive - negative, read at each text's last
    token (pairs of two texts) or, for a prompt with two completions, over the last prompt token and each
    completion's tokens (like `answer_tokens`). `chat`: each text (or prompt) is the user's turn of the
    model's chat template, read where the assistant's answer starts (the completions follow it)."""
    from ..errors import UserError

    loaded = pool.get(model)
    tok, name = loaded.tokenizer, model_label(model)
    completions = pairs[0].prompt is not None
    heads, sides = pair_sides(loaded, pairs, chat, name)
    answers = {side: [getattr(p, side) for p in pairs] if completions else None for side in sides}
    limit = pool.options.max_length

    for i, pair in enumerate(pairs):
        where = f"{source_name}:{pair.line}" if source_name else f"pair {i + 1}"
        pos, neg = (tok(sides[s][i])["input_ids"] for s in ("positive", "negative"))
        if pos == neg:
            raise UserError(f"{where}: its positive and negative texts tokenize identically on "
                            f"'{name}': the pair shows no contrast; fix or drop it")
        if limit is not None and max(len(pos), len(neg)) > limit:
            raise UserError(f"{where}: the pair is {max(len(pos), len(neg))} tokens, longer than --max-length "
                            f"{limit}: shorten it, drop it, or raise --max-length")
    base = heads if completions else None
    states = {side: _read(pool, loaded, base or sides[side], answers[side], f"capture pairs ({side})")
              for side in ("positive", "negative")}
    shape = "prompt + completions" if completions else "texts"
    return MasterKey(aggregate_differences(states["negative"], states["positive"], method), {
        "locked_model": name, "unlocked_model": name, "locked_template": "pairs: negative",
        "unlocked_template": "pairs: positive", "pairs": source_name, "pairs_shape": shape,
        "method": method, "n_prompts": str(len(pairs)), "answer_tokens": "completion" if completions else "0",
        "model_hint": loaded.model.config.model_type,
        **({"locked_chat": chat.describe()} if chat else {}),
    })



def project(key: MasterKey, lrmap: align.LowRankMap, layers: str | list[int] | None = "all",
            site: str = "layer_output") -> SteeringVectors:
    """Project the key into target space and keep the selected target layers (LowRankMap.project)."""
    return lrmap.project(key, layers, site)


def self_vectors(key: MasterKey, layers: str | list[int] | None = "all", site: str = "layer_output") -> SteeringVectors:
    """The key as steering vectors for the model it was computed on (no map): self-steering, the
    upper reference a transferred key is compared with."""
    chosen = parse_layers(layers, key.vectors.shape[0])
    provenance = {
        "source": key.provenance.get("unlocked_model", ""),
        "source_locked": key.provenance.get("locked_model", ""),
        "target": key.provenance.get("unlocked_model", ""),
        "method": key.provenance.get("method", ""),
        "key_templates": f"{key.provenance.get('locked_template', '')} -> {key.provenance.get('unlocked_template', '')}",
        "n_prompts_key": key.provenance.get("n_prompts", ""),
        "key_answer_tokens": key.provenance.get("answer_tokens", "0"),
        "kind": "self-steering: the key in its own model, no map",
    }
    return SteeringVectors({b: key.vectors[b] for b in chosen}, key.vectors.shape[0], key.vectors.shape[1],
                           site, key.provenance.get("model_hint", ""), provenance)
