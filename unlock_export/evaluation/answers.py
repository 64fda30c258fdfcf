"""Numeric answers: the gold answer of a math item and the number a model's output commits to.

Gold: GSM8K's `answer` ends with `#### N`; a plain numeric `answer` field is taken as it is.
Prediction, in order of trust: `\\boxed{...}`, "#### N", "the answer is N" (and "Answer: N"),
else the last number in the text. Numbers may carry `$`, `%`, thousands commas, a sign,
decimals, or be fractions (`3/4`, `\\frac{3}{4}`); they compare as exact fractions.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUM = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
_NUMBER = re.compile(_NUM)
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_ANSWER_IS = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)?\s*[:=]?\s*(" + _NUM + ")", re.I)
_HASHES = re.compile(r"####\s*(" + _NUM + ")")


def to_fraction(text: str) -> Fraction | None:
    """'1,234.5' -> 2469/2, '$3' -> 3, '3/4' -> 3/4, '\\frac{3}{4}' -> 3/4; None if not a number."""
    text = text.strip()
    m = _FRAC.fullmatch(text)
    if m:
        text = f"{m.group(1)}/{m.group(2)}"
    text = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".%")
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = Fraction(num) / Fraction(den)
        else:
            value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def _boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def _first_number(text: str) -> Fraction | None:
    frac = _FRAC.search(text)
    if frac:
        return to_fraction(frac.group(0))
    m = _NUMBER.search(text)
    return to_fraction(m.group(0)) if m else None


def extract_prediction(output: str) -> Fraction | None:
    """The number a model's output commits to, or None."""
    boxed = _boxed(output)
    if boxed is not None:
        value = _first_number(boxed)
        if value is not None:
            return value
    for pattern in (_HASHES, _ANSWER_IS):
        matches = pattern.findall(output)
        if matches:
            value = to_fraction(matches[-1])
            if value is not None:
                return value
    numbers = list(_NUMBER.finditer(output))
    fracs = list(_FRAC.finditer(output))
    if fracs and (not numbers or fracs[-1].end() >= numbers[-1].end()):
        return to_fraction(fracs[-1].group(0))
    return to_fraction(numbers[-1].group(0)) if numbers else None


def gold_answer(answer) -> Fraction | None:
    """GSM8K's '... #### 72' or a plain number (int, float or string)."""
    if isinstance(answer, (int, float)):
        return Fraction(str(answer))
    text = str(answer)
    m = _HASHES.search(text)
    return to_fraction(m.group(1)) if m else to_fraction(text)


def states_answer(output: str) -> bool:
    """Whether an output commits to its answer in words or a marker (`\\boxed{}`, "#### N", "the answer
    is N"), rather than leaving it to the last number in the text."""
    return _boxed(output) is not None or bool(_HASHES.search(output) or _ANSWER_IS.search(output))


def shows_steps(output: str) -> bool:
    """Whether an output shows intermediate work: an equation or operator between numbers, or
    several lines or sentences with numbers before the final answer."""
    if re.search(r"\d\s*[-+*/×x=]\s*\$?\d", output):
        return True
    numbered_chunks = [c for c in re.split(r"[\n.;]\s*", output) if _NUMBER.search(c)]
    return len(numbered_chunks) >= 3
