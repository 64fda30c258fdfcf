"""The template mini-language of scripts/report_specs.py (its docstring describes it): key paths, `{expr:format}`
templates filled from a results file, and the formats (num, pct, interval, pvalue, ...) they name. Used by
scripts/render_report.py.
"""

from __future__ import annotations

import json
import operator
import re
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal

from report_specs import DESCRIBED_PREFIXES, DESCRIPTIONS

KEY = re.compile(r'\[(-?\d+|[*@]|"(?:[^"\\]|\\.)*"|\w+=[^\]]*)\]|([^.\[\]]+)')   # one key of a key path
PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
OPERATORS = {"/": operator.truediv, "*": operator.mul, "-": operator.sub}
EMPTY = (None, [], {})


# -- formats ------------------------------------------------------------------------------------

def _dec(x) -> Decimal:
    return Decimal(repr(float(x)))


def num(x, places: int = 1) -> str:
    """x rounded half up (on its decimal repr, so 0.345 is 0.35) to `places` decimals."""
    return str(_dec(x).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def pct(x, places: int = 1) -> str:
    return f"{num(_dec(x) * 100, places)}%"


def interval(lo: float, hi: float) -> str:
    return f"{num(_dec(lo) * 100)}-{num(_dec(hi) * 100)}%"


def pvalue(p: float) -> str:
    """Two significant digits (0.10, 0.0038), '1' for p that rounds to 1, 2.0e-06 below 0.001."""
    if p < 0.001:
        return f"{p:.1e}"
    d = _dec(p)
    q = d.quantize(Decimal(1).scaleb(d.adjusted() - 1), rounding=ROUND_HALF_UP)
    if q.adjusted() > d.adjusted():  # 0.0999 -> 0.100: keep two digits
        q = q.quantize(Decimal(1).scaleb(q.adjusted() - 1), rounding=ROUND_HALF_UP)
    return "1" if q >= 1 else str(q)


def general(x) -> str:
    """A recorded setting (a scale, an alpha) as written: 0.4204, 0.022097, 0.1."""
    return (str(int(x)) if x.is_integer() else f"{x:.6g}") if isinstance(x, float) else str(x)


def code(text) -> str:
    """`text` as an inline code span that survives backticks and table pipes."""
    text = str(text)
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def key(*keys) -> str:
    """A key path as sources write it: table_200_questions.configs.paper-form, points[0], x["a b"], gates[*]."""
    out = ""
    for k in keys:
        if isinstance(k, int) or k == "*":
            out += f"[{k}]"
        else:
            out += ("." if out else "") + k if re.fullmatch(r"[A-Za-z0-9_\-]+", k) else f"[{json.dumps(k)}]"
    return out


def code_key(*keys) -> str:
    return code(key(*keys))


def parse_key(text: str) -> list:
    """The keys of a key path as key() writes it; [@] stays '@' and [field=value] is (field, value)."""
    return [bare or (inner if inner in ("*", "@") else json.loads(inner) if inner[0] in '"-0123456789'
                     else tuple(inner.split("=", 1))) for inner, bare in KEY.findall(text)]


def describe(name: str) -> str:
    text = DESCRIPTIONS.get(name) or next(
        (text for prefix, text in DESCRIBED_PREFIXES.items() if name.startswith(prefix)), None)
    return f"{code(name)}: {text}" if text else code(name)


FORMATS = {  # a template's {expr:format}; those with decimal places take them from its digits (num2)
    "num": num, "pct": pct, "general": general, "code": code, "describe": describe, "pvalue": pvalue,
    "minutes": lambda seconds: f"{num(_dec(seconds) / 60)} min", "signed": lambda x: ("+" if x >= 0 else "") + pct(x),
    "interval": lambda bounds: interval(*bounds), "range": lambda xs, n=1: f"{num(min(xs), n)}-{num(max(xs), n)}",
    "slash": lambda xs, n=1: " / ".join(num(x, n) for x in xs),
    "nums": lambda xs, n=1: ", ".join(num(x, n) for x in xs), "join": ", ".join,
    "tokens": lambda tokens: " ".join(code(json.dumps(t, ensure_ascii=False)) for t in tokens),
    "times": lambda x, n=1: f"x{num(x, n)}", "yesno": lambda x: "yes" if x else "no", "last": lambda n: n - 1,  # the last of n questions counted from 0
    "stage": lambda name: name.removesuffix("_s"), "basename": lambda name: name.split("/")[-1],
    "key": lambda path: code_key(*path)}


# -- templates ----------------------------------------------------------------------------------

@dataclass
class Doc:
    name: str           # file name inside the results folder
    link: str           # its path relative to the report
    data: object


def entries(node) -> list:
    return list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(node, list) else []


def dig(node, keys: list, path: tuple = ()) -> tuple:
    """(key path, value) of `keys` below `node`, which is at `path`; KeyError where absent."""
    for i, k in enumerate(keys):
        if k == "*":  # what the keys after it find in each entry
            found = []
            for _, entry in entries(node):
                try:
                    found.append(dig(entry, keys[i + 1:])[1])
                except KeyError:
                    pass
            return (*path, *keys[i:]), found
        if isinstance(k, tuple):  # (field, value): the first entry whose field has that value
            k = next((j for j, e in entries(node) if isinstance(e, dict) and str(e.get(k[0])) == k[1]), k)
        try:
            node, path = node[k], (*path, k)
        except (KeyError, IndexError, TypeError):
            raise KeyError(k) from None
    return path, node


@dataclass
class Scope:
    """What a template reads: a results file, the current row's key path in it, variables (name: (key path or
    None, value)) and the key paths read so far; for the renderer, the report's folders and results files."""
    doc: Doc | None = None
    path: tuple = ()
    vars: dict = field(default_factory=dict)
    read: list = field(default_factory=list)
    folders: tuple = ()         # (results, out)
    docs: dict = field(default_factory=dict)

    def at(self, path: tuple | None = None, **values) -> Scope:
        """This scope at another row, with these variables added and nothing read yet."""
        return replace(self, path=self.path if path is None else path, read=[],
                       vars={**self.vars, **{name: (None, value) for name, value in values.items()}})

    def term(self, text: str) -> tuple:
        """(key path or None, value) of a "text", a number, @, sum(key) or a key."""
        if text.startswith('"') or text.isdigit():
            return None, json.loads(text)
        if text == "@":
            return None, self.path[-1]
        if text.startswith("sum("):
            return None, sum(self.term(text[4:-1])[1])
        keys = [self.path[-1] if k == "@" else k for k in parse_key(text)]
        if text.startswith("."):
            path, value = dig(self.doc.data, [*self.path, *keys])
        elif keys[0] in self.vars:
            start, value = self.vars[keys[0]]
            path, value = dig(value, keys[1:]) if start is None else dig(self.doc.data, [*start, *keys[1:]])
        else:
            path, value = dig(self.doc.data, keys)
        self.read.append(path)
        return path, value

    def evaluate(self, text: str) -> tuple:
        """(key path or None, value, format) of the first of text's ' | ' alternatives present and not null, else
        of the first null one; KeyError where none is present."""
        null = None
        for alternative in text.split(" | "):
            expr, _, spec = alternative.rpartition(":")
            expr, spec = (expr, spec) if expr and re.fullmatch(r"[\w.]*", spec) else (alternative, "")
            first, *rest = [expr] if expr.startswith('"') else re.split(r" ([-*/]) ", expr)
            try:
                path, value = self.term(first)
                for op, operand in zip(rest[::2], rest[1::2]):
                    right = self.term(operand)[1]
                    path, value = None, None if value is None or right is None else OPERATORS[op](value, right)
            except KeyError:
                continue
            if value is not None:
                return path, value, spec
            null = null or (path, value, spec)
        if null is None:
            raise KeyError(text)
        return null

    def locate(self, text: str | None) -> tuple:
        """(key path, value) of text, (None, None) where it is absent."""
        try:
            return self.evaluate(text)[:2] if text else (None, None)
        except KeyError:
            return None, None

    def fill(self, template: str) -> str | None:
        """The template filled: None where a value is null or empty, KeyError where one is absent."""
        texts = []
        for body in PLACEHOLDER.findall(template):
            _, value, spec = self.evaluate(body)
            if value in EMPTY:
                return None
            match = re.fullmatch(r"([a-z]+)(\d*)", spec or "general")
            if match and match[1] in FORMATS:
                texts.append(str(FORMATS[match[1]](value, *([int(match[2])] if match[2] else []))))
            else:
                texts.append(format(value, spec))
        parts = iter(texts)
        return PLACEHOLDER.sub(lambda _: next(parts), template)

    def filled(self, template: str, absent: str | None = None) -> str | None:
        """fill, `absent` where a value is absent or null: None for a paragraph left out, '-' for a cell."""
        try:
            text = self.fill(template)
        except KeyError:
            return absent
        return absent if text is None else text

    def questions(self, text: str) -> range:
        """The questions start:stop."""
        return range(*(self.evaluate(bound)[1] for bound in text.split(":")))
