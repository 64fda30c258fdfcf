"""Settings defined once: each is a dataclass whose defaults are the library's, the CLI's and the
recipe's (the CLI generates its flags from the fields, cli.options.settings_options; the recipe schema
takes its defaults from them; tests/test_settings.py checks that every entry agrees). Torch-free, so
the CLI reads them without loading a model library.

GateSettings         how the gated edit's gates are fitted and how strong it is (fold, eval, the API)
CalibrationSettings  how the label-free scale of a fold is chosen (calibrate, a recipe's fold, the API)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .errors import UserError

DEFAULT_RIDGE = 1e-2
ANSWER_TOKENS = 16  # greedy answer tokens after each fit prompt: gates k > 1 open there, the rest are negatives


def setting(default, help: str):
    """A settings field: its one default, and the help its generated flag shows (cli.options.settings_options)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GateSettings:
    """How the gates are fitted and how strong the edit is: one object for fold, eval and the API."""

    prompts: str = setting("builtin:gsm8k-train",
        "Unlabeled prompts of the target the gates are fitted on (their answers are never read).")
    count: int = setting(32, "Prompts the gates are fitted on (after the offset).")
    offset: int = setting(0, "Skip this many of the gate prompts first.")
    heldout: int = setting(8,
        "The next prompts, held out: they measure the gates, choose multiplier auto and give the closeness to "
        "the paper form (KL at the answer start) beside the bias fold's.")
    template: str = setting("direct", "The prompt template of the gate prompts.")
    chat: bool = setting(False,
        "Wrap the gate prompts in the target's chat template (as the model is served through a chat endpoint).")
    system: str | None = setting(None, "With chat: a system turn for the gate prompts.")
    alpha: float = setting(0.1, "The paper form's strength, which the edit reproduces.")
    multiplier: float | str = setting(1.0,
        "The write is multiplier x alpha x |h| x the unit direction (1: the paper form's own strength); auto: "
        "the multiplier closest to the paper form on the held-out prompts within a perplexity guard (no labels).")
    ridge: float = setting(DEFAULT_RIDGE, "The gate fit's ridge.")
    rank: int = setting(1,
        "Gates per layer: the last prompt token, then the first rank-1 answer tokens.")
    ppl_margin: float = setting(0.10,
        "multiplier auto and the bias fold's figure: allowed relative rise of perplexity on plain text.")

    @classmethod
    def from_dict(cls, values: dict | None) -> "GateSettings":
        values = dict(values or {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown gate settings {sorted(unknown)}: use "
                            + ", ".join(f.name for f in fields(cls)))
        return cls(**values)

    def check(self) -> None:
        if self.count < 1 or self.heldout < 0 or self.offset < 0:
            raise UserError(f"the gate fit needs count >= 1 (--gate-count), heldout >= 0 (--gate-heldout) and "
                            f"offset >= 0 (--gate-offset), got {self.count}, {self.heldout} and {self.offset}")
        if not 1 <= self.rank <= ANSWER_TOKENS:
            raise UserError(f"the gated edit's rank (--rank) runs from 1 to {ANSWER_TOKENS}, got {self.rank}")
        auto = self.multiplier == "auto"
        if not auto and (isinstance(self.multiplier, str) or not self.multiplier > 0):
            raise UserError(f"the multiplier must be a positive number or 'auto', got {self.multiplier!r}")
        if auto and self.heldout < 1:
            raise UserError("multiplier 'auto' is chosen on the held-out prompts: keep at least one")
        if self.ppl_margin < 0:
            raise UserError(f"the perplexity margin must be >= 0, got {self.ppl_margin:g}")
        if self.system and not self.chat:
            raise UserError("a gate system text is a chat turn: set the gate fit's chat too")
        if self.alpha <= 0 or self.ridge <= 0:
            raise UserError(f"alpha and ridge must be positive, got {self.alpha:g} and {self.ridge:g}")


@dataclass(frozen=True)
class CalibrationSettings:
    """How the additive (folded) scale is chosen without labels: the one closest to the paper form at
    `alpha` by `objective`, among the scales that keep perplexity within `ppl_margin`."""

    alpha: float = setting(0.1, "The paper form's strength to match.")
    count: int = setting(8, "Prompts the calibration reads (the first of the prompts).")
    scales: tuple[float, ...] | None = setting(None,
        "The additive scales searched (default 0, then 1/256..64 in sqrt(2) steps): the perplexity guard's boundary "
        "found by bisection, the objective measured at every allowed scale, then refined around the best.")
    ppl_margin: float = setting(0.10,
        "Allowed relative rise of perplexity on plain text (0.10 = +10%).")
    objective: str = setting("answer-start",
        "answer-start: KL of the next-token distribution at the last prompt token; continuation: cross-entropy "
        "of the paper form's greedy continuations under the additive form.")
    continuation_tokens: int = setting(32,
        "continuation: tokens of each paper-form continuation scored.")


def default(settings: type, name: str):
    """The one default of a settings field."""
    return next(f.default for f in fields(settings) if f.name == name)
