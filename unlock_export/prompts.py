"""Unlabeled prompts and the templates that make locked / unlocked variants of them."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UserError

# Named templates. `{question}` is replaced by the prompt text. The CoT contrast of the paper:
# the locked variant asks for the answer directly, the unlocked one starts step-by-step reasoning.
TEMPLATES: dict[str, str] = {
    "plain": "{question}",
    "direct": "Question: {question}\nAnswer:",
    "cot": "Question: {question}\nAnswer: Let's think step by step.\n",
    # MATH-style problems, whose answers are LaTeX: the final answer asked for in \\boxed{}
    "math": "Problem: {question}\nGive the final answer in \\boxed{}.\nSolution:",
    "math-cot": "Problem: {question}\nGive the final answer in \\boxed{}.\nSolution: Let's think step by step.\n",
}

BUILTIN_PREFIX = "builtin:"


def template_text(name_or_format: str) -> str:
    """A named template, or a literal format string containing {question}."""
    if name_or_format in TEMPLATES:
        return TEMPLATES[name_or_format]
    if "{question}" not in name_or_format:
        raise UserError(
            f"template '{name_or_format}' is neither a named template ({', '.join(TEMPLATES)}) "
            "nor a format string containing {question}"
        )
    return name_or_format


def apply_template(template: str, questions: list[str]) -> list[str]:
    text = template_text(template)
    return [text.replace("{question}", q) for q in questions]


def builtin_arithmetic(count: int, seed: int = 0) -> list[str]:
    """Deterministic small arithmetic word problems: an offline prompt source with no data file."""
    rng = random.Random(seed)
    names = ["Ava", "Ben", "Chloe", "Dev", "Ema", "Finn", "Gita", "Hugo", "Iris", "Jon"]
    items = ["apples", "books", "coins", "stickers", "marbles", "pencils", "cookies", "shells"]
    out = []
    for _ in range(count):
        a, b, c = rng.randint(2, 40), rng.randint(2, 30), rng.randint(2, 9)
        name, other, item = rng.choice(names), rng.choice(names), rng.choice(items)
        kind = rng.randrange(4)
        if kind == 0:
            q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        elif kind == 1:
            q = f"{name} has {a + b} {item} and gives {b} to {other}. How many {item} are left?"
        elif kind == 2:
            q = f"{name} buys {c} boxes with {a} {item} in each box. How many {item} is that in total?"
        else:
            q = (f"{name} has {a * c} {item} and shares them equally among {c} friends. "
                 f"How many {item} does each friend get?")
        out.append(q)
    return out


# Data sets shipped inside the package (unlock_export/data, each under its MIT licence: LICENSE-GSM8K,
# LICENSE-MATH500, LICENSE-AGIEVAL-MATH): name -> (file, what it holds). Train: questions only (unlabeled
# prompts); the others: questions and answers. Choose on dev; confirm a choice once on gsm8k-confirm.
BUILTIN_FILES: dict[str, tuple[str, str]] = {
    "gsm8k-train": ("gsm8k-train.jsonl.gz", "GSM8K train questions (7,473, no answers)"),
    "gsm8k-dev": ("gsm8k-dev.jsonl.gz", "GSM8K dev split (400 test questions with answers, for development)"),
    "gsm8k-confirm": ("gsm8k-confirm.jsonl.gz", "GSM8K confirmation split (400 other test questions with answers, "
                                                "for confirming a choice made on dev, once)"),
    "math500": ("math500.jsonl.gz", "MATH-500 (PRM800K's 500 MATH test problems; LaTeX answers, level, subject)"),
    "agieval-math": ("agieval-math.jsonl.gz", "AGIEval-Math (AGIEval's 1,000 MATH problems; LaTeX answers, level, "
                                              "subject)"),
}
BUILTIN_SETS = {"arithmetic": builtin_arithmetic}
BUILTIN_NAMES = tuple(BUILTIN_PREFIX + n for n in (*BUILTIN_SETS, *BUILTIN_FILES))


def is_builtin(source: str | Path) -> bool:
    return str(source).startswith(BUILTIN_PREFIX)


def builtin_file(name: str) -> Path:
    """The packaged file behind `builtin:NAME` (BUILTIN_FILES)."""
    if name not in BUILTIN_FILES:
        raise UserError(f"unknown builtin data set '{BUILTIN_PREFIX}{name}': use {', '.join(BUILTIN_NAMES)}")
    return Path(str(resources.files("unlock_export") / "data" / BUILTIN_FILES[name][0]))


def jsonl_lines(source: str | Path, what: str = "prompt file") -> Iterator[tuple[int, str]]:
    """(line number, text) of a JSONL file, plain or gzip, or of a packaged `builtin:` data set."""
    source = str(source)
    if is_builtin(source):
        path = builtin_file(source[len(BUILTIN_PREFIX):])
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"{what} '{source}' not found: pass a JSONL file or one of {', '.join(BUILTIN_NAMES)}")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        yield from enumerate(fh, 1)


def jsonl_records(source: str | Path, what: str = "prompt file") -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value) of each non-blank line (jsonl_lines); a line that is not JSON is
    refused in one line naming it."""
    for lineno, line in jsonl_lines(source, what):
        line = line.strip()
        if not line:
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}:{lineno} is not valid JSON ({exc.msg}); each line must be one JSON object")


def load_questions(source: str | Path, field: str = "question", count: int | None = None,
                   offset: int = 0) -> list[str]:
    """Read `count` prompts starting at `offset` from a JSONL file (field `field`) or a builtin set."""
    source = str(source)
    if count is not None and count < 1:
        raise UserError(f"prompt count must be at least 1, got {count}")
    name = source[len(BUILTIN_PREFIX):] if is_builtin(source) else None
    if name in BUILTIN_SETS:
        return BUILTIN_SETS[name]((count or 256) + offset)[offset:]
    questions: list[str] = []
    for lineno, record in jsonl_records(source):
        if isinstance(record, str):
            text = record
        elif isinstance(record, dict) and isinstance(record.get(field), str):
            text = record[field]
        else:
            raise UserError(f"{source}:{lineno} has no string field '{field}': pass --field with the prompt field's name")
        if text.strip():
            questions.append(text)
        if count is not None and len(questions) >= offset + count:
            break
    questions = questions[offset:]
    if not questions:
        raise UserError(f"prompt file '{source}' holds no prompts (after offset {offset}): give a non-empty JSONL file")
    return questions


# -- contrastive pairs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    """One contrastive pair: two full texts (`prompt` None: read at each text's last token), or one
    prompt with two completions (read over each completion's tokens). `line`: where it was read."""

    positive: str
    negative: str
    prompt: str | None = None
    line: int = 0


def load_pairs(source: str | Path, count: int | None = None, offset: int = 0) -> list[Pair]:
    """Contrastive pairs from a JSONL file: rows {"positive": ..., "negative": ...} (two full texts) or
    {"prompt": ..., "positive": ..., "negative": ...} (one prompt, two completions), one shape per file
    (repeng's and steering-vectors' (positive, negative) pairs; CAA's A/B pairs as completions)."""
    if count is not None and count < 1:
        raise UserError(f"pair count must be at least 1, got {count}")
    pairs: list[Pair] = []
    first_shape: tuple[int, bool] | None = None
    for lineno, record in jsonl_records(source, "pairs file"):
        sides = [record.get(k) if isinstance(record, dict) else None for k in ("positive", "negative")]
        if not all(isinstance(s, str) and s.strip() for s in sides):
            missing = [k for k, s in zip(("positive", "negative"), sides) if not (isinstance(s, str) and s.strip())]
            raise UserError(f"{source}:{lineno}: a pair needs non-empty 'positive' and 'negative' texts "
                            f"('{missing[0]}' is missing or empty)")
        prompt = record.get("prompt")
        if prompt is not None and not (isinstance(prompt, str) and prompt.strip()):
            raise UserError(f"{source}:{lineno}: 'prompt' must be a non-empty text, or left out")
        shape = (lineno, prompt is not None)
        if first_shape is None:
            first_shape = shape
        elif shape[1] != first_shape[1]:
            has = "has a 'prompt'" if shape[1] else "has no 'prompt'"
            raise UserError(f"{source}:{lineno} {has} but line {first_shape[0]} {'does not' if shape[1] else 'does'}: "
                            "one shape per file (two texts, or a prompt with two completions)")
        pairs.append(Pair(sides[0], sides[1], prompt, lineno))
        if count is not None and len(pairs) >= offset + count:
            break
    pairs = pairs[offset:]
    if not pairs:
        raise UserError(f"pairs file '{source}' holds no pairs (after offset {offset}): give a JSONL file of "
                        "{\"positive\": ..., \"negative\": ...} rows")
    return pairs


# -- chat templates ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chat:
    """Prompts wrapped by the model's own chat template: a `system` turn when given, the prompt as the
    user's turn, then the assistant's turn opened (as a chat endpoint sends it to the model)."""

    system: str | None = None

    def describe(self) -> str:
        """How a key or map file's provenance names this wrapping."""
        return "chat template" + (f", system: {self.system}" if self.system else "")


def chat_texts(tokenizer, texts: list[str], chat: Chat, model: str = "the model") -> list[str]:
    """`texts` as `chat` wraps them with `tokenizer`'s chat template (refused in one line for a model
    without one). A leading BOS the template writes and the tokenizer adds anyway is left to the tokenizer,
    so it is not doubled."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{model} has no chat template (a base model?): drop --chat (chat: true), or give a "
                        "template with {question} instead")
    bos = getattr(tokenizer, "bos_token", None)
    adds_bos = bool(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    out = []
    for text in texts:
        messages = ([{"role": "system", "content": chat.system}] if chat.system else []) + \
            [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if adds_bos and rendered.startswith(bos):
            rendered = rendered[len(bos):]
        out.append(rendered)
    return out
