"""What scripts/render_report.py renders, as data: for each report its results files, sections, tables and
prose, and which JSON keys feed which cells in which format; for the README its generated blocks.

Keys are written as the reports print them: `table_200_questions.configs.paper-form`, `points[0]`,
`configs["scale-0.0442"]`; `[*]` stands for every entry, `[method=ours]` for the first entry whose `method` is
`ours`, `[@]` for the current row's own key. A key that starts with `.` is read from the current row (a table's
entry, a run), one that starts with a variable's name (`big`, `records`) from that variable, any other from the
top of the file.

Templates (titles, prose, cells, captions) hold `{expr}` or `{expr:format}`. An expr is a key, a number, `@`
(the current row's key), a "quoted" text or `sum(key)`, joined by ` / `, ` * ` or ` - ` (left to right); `a | b`
takes the first alternative that is present and not null, each with its own format. A format is one of
report_template.FORMATS, with decimal places after it (`num2`: 2 places, half up; `pct0`: a whole percent),
or else a Python format spec (`.2g`). A value that is absent or null leaves out the paragraph, fixed table row
or caption that reads it; in a row per entry or a title it shows as `-`. A row one cell short of its table gets
its source there: the entry's key, or the keys its value cells read. A block with a `when` is left out unless
that is present and not empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# -- the vocabulary -------------------------------------------------------------------------------------------


@dataclass
class Report:
    file: str                  # written to reports/
    title: str
    inputs: list[str]          # the results files its Inputs table lists, in that order
    body: list


@dataclass
class From:
    name: str                  # a results file: the blocks below read it; left out where it is absent
    body: list
    vars: dict[str, str] = field(default_factory=dict)   # name: expr, read once from the file


@dataclass
class Section:
    level: int
    title: str
    body: list
    when: str | None = None    # (and left out where its body renders nothing)


@dataclass
class Para:
    text: str
    when: str | None = None
    pairs: dict = field(default_factory=dict)   # name: Pair, whose counts the text reads as {name.won}


@dataclass
class Note:
    key: str                   # a recorded note, quoted where it is a non-empty text


@dataclass
class Bullets:
    items: list[str]           # as they are, not templates


@dataclass
class Plots:
    items: list[tuple[str, str]]   # (image in the results folder, its text), listed where the image exists


@dataclass
class Details:
    summary: str               # a collapsed block, left out where its summary cannot be filled
    body: list


@dataclass
class Each:
    key: str                   # a row per entry of this list or mapping
    cells: list[str]
    where: str | None = None   # only the entries where this (a key from the entry) is present
    agree: list = field(default_factory=list)   # (recorded, computed, tolerance): else render_report.Inconsistent


@dataclass
class Table:
    headers: list[str]         # a last header `source` or `from` is named in the caption as the rows' keys
    rows: list                 # tuples of templates (fixed rows) and Each
    caption: str = ""          # after the file's link
    when: str | None = None


@dataclass
class Run:
    """One row of an accuracy table: a run's summary (n, correct, correct_indices, ...) and what it is paired with.
    A key with [*] gives a row per entry that records `correct`; in base and recorded, [*] is that entry."""
    key: str
    label: str = "{@:describe}"
    base: str | None = None       # won / lost against this run, from both correct_indices (never itself)
    recorded: str | None = None   # a recorded paired comparison: checked, or used where indices are lacking
    first: str | None = None      # where the run covers more questions, a row for the first this many too
    span: str | None = None       # the questions a pairing covers, start:stop (default: the run's own)
    scale: str | dict | None = None   # where its scale is (a dict: by the entry's name); default: in the run
    engine: str | None = None


@dataclass
class Eval:
    runs: list[Run]
    columns: list[tuple[str, str]] | None = None   # default EVAL_COLUMNS
    caption: str = "; baseline of won / lost: {base:key}"   # base: the first row's base run, where one has it
    grid: str | None = None       # a calibration grid: the row at each run's scale, as {grid.*}


@dataclass
class Pair:
    a: str
    b: str
    questions: str                # start:stop
    a_label: str | None = None    # default: the last key of a
    b_label: str | None = None
    recorded: str | None = None   # a recorded {won, lost, p_mcnemar_exact} of a against b: checked


@dataclass
class Pairs:
    pairs: list[Pair]


@dataclass
class Calibrations:
    entries: list[tuple[str, str]]   # (label, key): a summary row for each calibration, and its grid collapsed


RUN_SCALE = ".steering.scale | .steering.alpha | .steering.strength | .strength | .scale"  # a Run's default scale
RUN_PAIRED = ".paired | .paired_vs_unsteered"  # and its recorded paired comparison
GENERATED = ("_Generated by `python scripts/render_report.py` from the results JSON in `{results}`: "
             "do not edit by hand; `python scripts/render_report.py --check` says whether it is current._")


# -- shared columns -------------------------------------------------------------------------------------------

EVAL_COLUMNS = [
    ("configuration", "{label}"), ("engine", "{engine}"), ("scale (the paper form: alpha)", "{scale:general}"),
    ("correct", "{correct}/{n}"), ("accuracy", "{correct / n:pct}"), ("95% CI (Wilson)", "{ci:interval}"),
    ("mean output tokens", "{tokens:num0}"), ("cut at the token limit", "{cut:pct0}"),
    ("says \"the answer is\"", "{says:pct0}"), ("states the answer", "{states:pct0}"),
    ("won / lost vs baseline", "{won} / {lost}"), ("McNemar p (exact)", "{p:pvalue}"), ("wall time", "{wall:minutes}"),
    ("source", "{source}")]
PAIR_COLUMNS = [
    ("A", "{a_label}"), ("B", "{b_label}"), ("questions", "{start}-{stop:last}"), ("A right", "{a_right}"),
    ("B right", "{b_right}"), ("both right", "{both}"), ("same outcome", "{n - won - lost}"),
    ("A only (won)", "{won}"), ("B only (lost)", "{lost}"), ("McNemar p (exact)", "{p_mcnemar_exact:pvalue}"),
    ("source", "{source}")]
CALIBRATION_COLUMNS = [  # of a calibration (.), its label, its chosen scale and its grid's row at that scale (at)
    ("calibration", "{label}"), ("objective", "{.objective}"), ("prompts", "{.prompts:general}"),
    ("chosen scale", "{scale:general}"),
    ("KL to the paper form at it", "{.kl_to_reference:num2 | at.kl_to_reference:num2}"),
    ("KL unsteered", "{.kl_unsteered_to_reference:num2}"), ("perplexity ratio at it", "x{at.perplexity_ratio:num3}"),
    ("perplexity guard", "+{.ppl_margin:pct0}"), ("source", "{source}")]
GRID_HEADERS = ["scale", "KL to the paper form", "perplexity ratio", "within the guard", "continuation cross-entropy"]
GRID_CELLS = [  # every scale a calibration tried; the last column only where a row records it. A search that
    # bisects the guard leaves the objective unmeasured over it and the perplexity below an allowed scale
    '{.scale:general}', '{.kl_to_reference:num3 | "not measured (over the guard)"}',
    '{.perplexity_ratio:times3 | "not measured (below an allowed scale)"}', '{.allowed:yesno}',
    '{.continuation_ce:num3 | "-"}']
SETTINGS = Table(["setting", "value", "source"], [
    ("target", "{target}"), ("vectors", "{vectors}"), ("questions (as recorded)", "{data:code}"),
    ("prompt template", "{template}"), ("max new tokens", "{max_new_tokens}"), ("machine", "{machine}"),
    ("command", "{command:code}")])
RUN_SIZES = {"big": "table_200_questions.configs.unsteered.n | 200",   # the big table's questions: 0..big-1
             "small": "configs.unsteered.n | 64"}                     # the first, smaller round's


def alpha_check(model: str) -> Section:
    return Section(3, f"check-alpha after the paper-form fix (the {model})", when="alpha_check.after_fix", body=[
        Table(["alpha", "perplexity ratio of the paper form's continuations", "passes (within x2)",
               "first token changed", "source"],
              [Each("alpha_check.after_fix", ["{.alpha:general}", "x{.fluency_ratio:num2}", "{.allowed:yesno}",
                                               "{.first_token_changed:pct0}"])]),
        Para("Command as recorded: {alpha_check.command:code}.")])


# -- the GSM8K report -----------------------------------------------------------------------------------------

FORWARD = "eval_qwen0.5b_to_1.5b.json"
REVERSE = "eval_qwen1.5b_to_0.5b.json"
BANDS = "fold_bands_qwen1.5b.json"
GATED = "gated_fold_qwen1.5b.json"
GATED_LORA = "gated_lora_qwen1.5b.json"

DESCRIPTIONS = {
    "unsteered": "unsteered",
    "unsteered-transformers": "unsteered, transformers engine",
    "cot-prompt": "CoT prompt (\"Let's think step by step\", the prompting baseline)",
    "paper-form": "UNLOCK paper form (hooks: the last prompt token in prefill)",
    "paper-alpha-0.05": "UNLOCK paper form (hooks), a smaller alpha",
    "folded": "UNLOCK folded: the paper's last-token key at its label-free scale (patched GGUF)",
    "folded-answer-key": "UNLOCK folded: the key read over the answer's first tokens, label-free scale (patched GGUF)",
    "random": "random directions, the last-token vectors' norms and scale (control)",
    "random-answer-key": "random directions, the answer-start vectors' norms and scale (control)",
    "self-key": "the target's own last-token CoT key, its label-free scale (self-steering)",
    "self-answer-key": "the target's own CoT key read over the answer's first tokens",
    "tuned-answer-key": "the answer-start vectors at the scale held-out dev accuracy picks (uses labels)",
    "band-10-18-scale-0.125": "UNLOCK additive, layers 10-18 only, that band's label-free scale (control vector)",
    "answer-key-16-scale-0.4204": "UNLOCK additive, the key read over the answer's first 16 tokens (control vector)",
    "folded-answer-key-16-scale-0.4204": "UNLOCK folded, the key read over the answer's first 16 tokens (patched GGUF)",
    "gated-lora": "the gated LoRA: the paper form's last-token edit as a plain LoRA, label-free multiplier "
                  "(llama-server --lora)",
}
DESCRIBED_PREFIXES = {"scale-": "UNLOCK additive, all layers, at that scale (control vector)",
                      "answer-scale-": "the answer-start vectors at that scale (control vector)"}

HOW_MADE = (
    "How the figures are made: accuracy is correct / n; the 95% interval is the Wilson interval of those counts "
    "(`unlock_export.evaluation.run.wilson`); won / lost count the questions only one of the two runs gets right, "
    "from both runs' recorded `correct_indices` where the file has them (checked against the recorded counts), and "
    "the exact two-sided McNemar p comes from `unlock_export.evaluation.run.paired_comparison`. Mean output tokens, "
    "the cut rate (answers that reach the token limit), \"says the answer is\" and \"states the answer\" (\"the "
    "answer is N\", \"Answer: N\", `\\boxed{}` or `#### N`) are as the file records them; \"-\" where it does not. "
    "Which runs two corrections touched: [CHANGELOG.md](../CHANGELOG.md).")

T200 = "table_200_questions.configs"
BASE200 = f"{T200}.unsteered"
SUPERSEDED = "table_200_questions.superseded_paper_form_before_endoftext_fix"
ANSWER_KEY_PAIRS = "answer_key_16_200_questions.paired_folded_vs_unsteered"
TUNING = "answer_key_scale_by_held_out_accuracy"
MAX_512 = "max_new_tokens_512.configs"

FORWARD_200_SCALES = {
    "paper-form": "calibration.reference.strength", "folded": "calibration.scale", "random": "calibration.scale",
    "folded-answer-key": "answer_key_16.calibration.scale", "random-answer-key": "answer_key_16.calibration.scale",
    "tuned-answer-key": f"{TUNING}.picked_scale", "self-key": "calibration_self_key.scale"}
REVERSE_SCALES = {
    "paper-form": "calibration.reference.strength", "folded": "calibration.scale", "random": "calibration.scale",
    "folded-answer-key": "folded_answer_key_16.calibration.scale",
    "random-answer-key": "folded_answer_key_16.calibration.scale", "self-key": "calibration_self_key.scale"}

BANDS_SECTION = Section(3, "Which layers can a fold steer? (bands of layers, the 1.5B, last-token vectors)",
                        when="rows", body=[
    Table(["", "value", "source"], [
        ("KL(paper form ‖ unsteered) at the answer start", "{kl_unsteered_to_paper:num2}"),
        ("prompts, offset", "{prompts:general}, {offset:general}"),
        ("the paper form's top first tokens", "{paper_top_first_tokens:tokens}"),
        ("the unsteered model's top first tokens", "{unsteered_top_first_tokens:tokens}")]),
    Table(["layers", "scale", "KL to the paper form", "mass on the paper form's top token", "top-1 agreement",
           "perplexity ratio", "top first tokens (first 6 prompts)", "source"],
          [Each("rows", ["{.layers:code}", "{.scale:general}", "{.kl_to_paper:num2}", "{.paper_top_mass:num4}",
                         "{.top1_agreement:num2}", "x{.perplexity_ratio:num3}", "{.top_first_tokens:tokens}"])]),
    Note("note")])

GATED_SECTION = Section(3, "A gated weight edit (the paper form as weights; the 1.5B, last-token vectors)",
                        when="forms", body=[
    Table(["form", "KL(paper form ‖ form) at the answer start", "cross-entropy of the paper form's continuation",
           "perplexity ratio, plain text", "top first tokens", "source"],
          [Each("forms", ["{.form}", "{.kl_to_paper:num2}", "{.continuation_ce:num3}", "x{.ppl_ratio:num3}",
                          "{.top_first_tokens:tokens}"])]),
    Table(["gate value, across the steered layers", "range (min-max over layers)", "source"], [
        ("mean at the held-out prompts' last token", "{gates[*].at_last_prompt_token:range2}"),
        ("max |gate| at their other prompt tokens", "{gates[*].max_abs_other_prompt_tokens:range2}"),
        ("max |gate| in the paper form's answers", "{gates[*].max_abs_answer_tokens:range2}")], when="gates"),
    Table(["setting", "value", "source"], [
        ("gates fitted on prompts", "{args.fit_count:general}"), ("forms compared on prompts", "{args.count:general}"),
        ("prompt offset", "{args.offset:general}"), ("alpha", "{args.alpha:general}"),
        ("bias fold scale", "{args.bias_scale:general}"), ("wall time", "{wall_s:minutes}")]),
    Note("note"),
    Para("Accuracy of the gated edit at m 0.5 (first 64 dev questions, transformers):", when='["accuracy_m_0.5"]'),
    Eval([Run('["accuracy_m_0.5"]', label="gated edit, m 0.5", engine="transformers")],
         caption="; baseline of won / lost: the unsteered 200-question llama.cpp run's first 64 (recorded counts)"),
    Para('Hooks against merged weights, max logit gap: {["accuracy_m_0.5"].merge_gap_max_logit:.2g} '
         '(`["accuracy_m_0.5"].merge_gap_max_logit`).'),
    Note('["accuracy_m_0.5"].note')])

FORWARD_SECTION = Section(2, "0.5B -> 1.5B: the 0.5B's CoT direction carried into the 1.5B", [
    SETTINGS,
    Section(3, "{big} questions (dev 0-{big:last})", [
        Eval([Run(f"{T200}[*]", base=BASE200, scale=FORWARD_200_SCALES)]),
        Note("table_200_questions.note")]),
    Section(3, "{big} questions: rows against each other", when=T200, body=[
        Pairs([
            Pair(f"{T200}.folded-answer-key", f"{T200}.paper-form", "0:big"),
            Pair(f"{T200}.folded-answer-key", f"{T200}.self-answer-key", "0:big"),
            Pair(f"{T200}.folded-answer-key", f"{T200}.random-answer-key", "0:big"),
            Pair(f"{T200}.folded-answer-key", BASE200, "0:big", recorded=f"{ANSWER_KEY_PAIRS}.all_200"),
            Pair(f"{T200}.folded-answer-key", BASE200, "0:small", recorded=f"{ANSWER_KEY_PAIRS}.first_64"),
            Pair(f"{T200}.folded-answer-key", BASE200, "small:big", recorded=f"{ANSWER_KEY_PAIRS}.questions_64_199"),
            Pair(f"{T200}.paper-form", BASE200, "0:small"),
            Pair(f"{T200}.paper-form", BASE200, "small:big"),
            Pair(f"{T200}.paper-form", "configs.paper-form", "0:small", "paper-form ({big}-question run)",
                 "paper-form ({small}-question run, before the end-of-text fix)"),
            Pair(BASE200, "configs.unsteered", "0:small", "unsteered ({big}-question run)",
                 "unsteered ({small}-question run)"),
            Pair(SUPERSEDED, BASE200, "0:big", "paper-form before the end-of-text fix",
                 recorded=f"{SUPERSEDED}.paired_vs_unsteered.all_200"),
            Pair(SUPERSEDED, BASE200, "small:big", "paper-form before the end-of-text fix",
                 recorded=f"{SUPERSEDED}.paired_vs_unsteered.questions_64_199")]),
        Note("answer_key_16_200_questions.note")]),
    Section(3, "Superseded: the {big}-question paper form before the end-of-text fix", [
        Eval([Run(SUPERSEDED, label="paper form, alpha 0.1, before commit 5979731", base=BASE200,
                  recorded=f"{SUPERSEDED}.paired_vs_unsteered.all_200", engine="transformers")]),
        Note(f"{SUPERSEDED}.note")]),
    Section(3, "The label-free scale against one held-out accuracy picks (uses labels)", when=f"{TUNING}.points", body=[
        Eval([Run(f"{TUNING}.points[*]", label="{.run:code | @:code}", base=f"{TUNING}.points[0]",
                  span="held_out_start:held_out_stop", engine="llama.cpp")],
             EVAL_COLUMNS[:-1] + [("KL to the paper form (calibration)",
                                   '{grid.kl_to_reference:num2 | "- (not on the calibration grid)"}'),
                                  ("perplexity ratio (calibration)", "x{grid.perplexity_ratio:num3}"),
                                  ("source", "{source}")],
             grid=f"{TUNING}.calibration_table",
             caption="; questions {held_out_start}-{held_out_stop:last}, held out from the 200-question table"),
        Table(["", "scale", "source"], [
            ("label-free (calibration)", "{answer_key_scale_by_held_out_accuracy.label_free_scale:general}"),
            ("picked by held-out accuracy", "{answer_key_scale_by_held_out_accuracy.picked_scale:general}")]),
        Note(f"{TUNING}.note"),
        Calibrations([("answer-start vectors, this session's calibration", f"{TUNING}.calibration_table")])]),
    Section(3, "{small} questions (dev 0-{small:last}): every configuration tried", [
        Eval([Run("configs[*]", base="configs.unsteered", recorded="paired_against_unsteered[*]", first="small",
                  scale={"folded": "calibration.scale", "band-10-18-scale-0.125": "calibration_band_10_18.scale"})]),
        Pairs([
            Pair("configs.paper-form", "configs.unsteered-transformers", "0:configs.unsteered-transformers.n"),
            Pair("paper_form_recheck_after_fix", "configs.paper-form", "0:paper_form_recheck_after_fix.n",
                 "paper-form rerun after commit 591239a"),
            Pair('configs["answer-key-16-scale-0.4204"]', f"{T200}.folded-answer-key", "0:small",
                 "answer-key-16-scale-0.4204 (control vector)",
                 "folded-answer-key (patched GGUF, {big}-question run)")]),
        Note("paper_form_recheck_after_fix.note")]),
    Section(3, "512 new tokens", [
        Eval([Run(f"{MAX_512}[*]", base=f'{MAX_512}["unsteered (llama.cpp)"]')]),
        Note("max_new_tokens_512.note"),
        Note(f'{MAX_512}["folded-answer-key-16-scale-0.4204"].note')]),
    Section(3, "Label-free calibrations", [Calibrations([
        ("last-token vectors, all layers", "calibration"),
        ("last-token vectors, continuation objective", "calibration_continuation"),
        ("last-token vectors, layers 10-18", "calibration_band_10_18"),
        ("the 1.5B's own last-token key", "calibration_self_key"),
        ("answer-start vectors", "answer_key_16.calibration"),
        ("the 1.5B's own answer-start key", f"{T200}.self-answer-key.calibration")])]),
    Section(3, "The answer-start key against the last-token key (0.5B source)",
            when="answer_key_16.key_norms_first_last", body=[
        Table(["", "value", "source"], [
            ("key norm, first and last source layer", "{answer_key_16.key_norms_first_last:slash}"),
            ("the last-token key's norm, first and last layer",
             "{answer_key_16.last_token_key_norms_first_last:slash}"),
            ("cosine with the last-token key, per source layer (min-max)",
             "{answer_key_16.cosine_with_last_token_key_per_source_layer:range2}")]),
        Note("answer_key_16.note")]),
    alpha_check("1.5B"),
    From(BANDS, [BANDS_SECTION]),
    From(GATED, [GATED_SECTION])])

DIAGNOSTICS = ["source_layer", "key_norm", "vector_norm", "map_r2_heldout", "cosine_target_key"]
REVERSE_SECTION = Section(2, "1.5B -> 0.5B: the 1.5B's CoT direction carried into the 0.5B", [
    SETTINGS,
    Section(3, "{big} questions (dev 0-{big:last})", [
        Eval([Run(f"{T200}[*]", base=BASE200, scale=REVERSE_SCALES)]),
        Note("table_200_questions.note")]),
    Section(3, "{big} questions: rows against each other", [Pairs([
        Pair(f"{T200}.folded-answer-key", f"{T200}.random-answer-key", "0:big"),
        Pair(f"{T200}.self-answer-key", f"{T200}.folded-answer-key", "0:big"),
        Pair(f"{T200}.self-key", f"{T200}.cot-prompt", "0:big"),
        Pair(BASE200, "configs.unsteered", "0:small", "unsteered ({big}-question run)",
             "unsteered ({small}-question run)"),
        Pair(f"{T200}.paper-form", "configs.paper-form", "0:small", "paper-form ({big}-question run)",
             "paper-form ({small}-question run, before the end-of-text fix)")])]),
    Section(3, "{small} questions (dev 0-{small:last})", [
        Eval([Run("configs[*]", base="configs.unsteered", scale={"folded": "calibration.scale"}),
              Run("folded_answer_key_16", label='{"folded-answer-key":describe}', base="configs.unsteered",
                  scale="folded_answer_key_16.calibration.scale")]),
        Note("folded_answer_key_16.note")]),
    Section(3, "The recipe run", [
        Table(["stage", "seconds", "source"], when="recipe_summary.timings_s", rows=[
            Each("recipe_summary.timings_s", ["{@:stage}", "{.:num}"]),
            ("total", "{sum(recipe_summary.timings_s[*]):num}", "sum of the above")]),
        Table(["fold", "value", "source"], when="recipe_summary.fold.verification", rows=[
            ("scale", "{recipe_summary.fold.scale:general}"),
            ("carrier", "{recipe_summary.fold.carrier}"),
            ("verification max |dlogit| (tolerance)", "{recipe_summary.fold.verification.max_abs_dlogit:.2g} "
             "({recipe_summary.fold.verification.tolerance:general})",
             "`recipe_summary.fold.verification.max_abs_dlogit`"),
            ("steering effect, max |dlogit|", "{recipe_summary.fold.verification.steering_effect_max_abs_dlogit:num2}"),
            ("top-1 agreement", "{recipe_summary.fold.verification.top1_agreement:general}")])]),
    Section(3, "Diagnostics per target layer", when="diagnostics.layers", body=[
        Details("Per layer (<code>diagnostics</code>): held-out map R^2 {diagnostics.map_r2_heldout:range2}; "
                "cosine with the target's own key {diagnostics.cosine_target_key[0]:num2} at layer "
                "{diagnostics.layers[0]}, {diagnostics.cosine_target_key[-1]:num2} at layer {diagnostics.layers[-1]}", [
            Table(["target layer", "source layer", "key norm", "vector norm", "map R^2, held out",
                   "cosine with the 0.5B's own key"],
                  [Each("diagnostics.layers", [
                      "{.}", "{diagnostics.source_layer[@]}", "{diagnostics.key_norm[@]:num2}",
                      "{diagnostics.vector_norm[@]:num2}", "{diagnostics.map_r2_heldout[@]:num3}",
                      "{diagnostics.cosine_target_key[@]:num3}"])],
                  caption="; columns " + ", ".join(f"`diagnostics.{name}`" for name in DIAGNOSTICS)
                          + ", {diagnostics.heldout_prompts:general} held-out prompts, "
                            "rank {diagnostics.rank:general}")])]),
    Section(3, "Label-free calibrations", [Calibrations([
        ("transferred vectors (the recipe's)", "calibration"),
        ("the 0.5B's own last-token key", "calibration_self_key"),
        ("answer-start vectors", "folded_answer_key_16.calibration"),
        ("the 0.5B's own answer-start key", f"{T200}.self-answer-key.calibration")])]),
    alpha_check("0.5B"),
    Section(3, "Superseded runs (kept for the record)", when="superseded_paper_form_runs", body=[
        Eval([Run("superseded_paper_form_runs[*]", engine="transformers")],
             caption="; baseline of won / lost: the unsteered llama.cpp run on the same questions (recorded counts)"),
        Table(["model", "check-alpha ratio at alpha 0.1, before the fix", "source"], [
            (model, f'x{{superseded_paper_form_runs.check_alpha_before_fix["{model} fluency_ratio"]:num2}}')
            for model in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")]),
        Para("> Recorded reason (`superseded_paper_form_runs.why`): {superseded_paper_form_runs.why}")])])


def gated_lora_tokens(tokens: int) -> Section:
    """The gated LoRA's rows at one token limit: run here (configs) or taken from the recorded 200-question runs."""
    def run(name):
        return f"tokens_{tokens}.configs.{name} | tokens_{tokens}.recorded.{name}"
    strength = {"paper-form": "alpha", "folded-answer-key": "answer_key_scale", "gated-lora": "gate_fit.multiplier"}
    return Section(3, f"{tokens} new tokens", [
        Eval([Run(f"tokens_{tokens}.configs.{name}", base=run("unsteered"), scale=strength)
              for name in ("unsteered", "paper-form", "folded-answer-key", "gated-lora")]
             + [Run(f"tokens_{tokens}.recorded.{name}", base=run("unsteered"), scale=strength,
                    label="{@:describe} (the recorded 200-question run, questions 0-{count:last})")
                for name in ("unsteered", "paper-form", "folded-answer-key")]),
        Pairs([Pair(run("gated-lora"), run(other), "0:count") for other in ("paper-form", "folded-answer-key")]),
        Para("Unsteered {paper.b_right}/{count}; the paper form {paper.a_right}/{count} (won / lost against unsteered "
             "{paper.won} / {paper.lost}, p {paper.p_mcnemar_exact:pvalue}); the gated LoRA {gated.a_right}/{count} "
             "({gated.won} / {gated.lost} against unsteered, p {gated.p_mcnemar_exact:pvalue}; {versus.won} / "
             "{versus.lost} against the paper form, p {versus.p_mcnemar_exact:pvalue}).",
             pairs={"paper": Pair(run("paper-form"), run("unsteered"), "0:count"),
                    "gated": Pair(run("gated-lora"), run("unsteered"), "0:count"),
                    "versus": Pair(run("gated-lora"), run("paper-form"), "0:count")})])


GATED_LORA_SECTION = Section(  # experiments/gated_lora_table.py: the gated LoRA against unsteered and the paper form
    2, "The gated LoRA (the paper form as a per-request LoRA), 0.5B -> 1.5B, the first {count} questions", [
        Table(["setting", "value", "source"], [
            ("target", "{target:code}"), ("paper form alpha", "{alpha:general}"),
            ("gated LoRA multiplier (label-free)", "{gate_fit.multiplier:general}"),
            ("gate fit", "{gate_fit.fit_prompts} prompts, rank {gate_fit.rank}, ridge {gate_fit.ridge:general}",
             "`gate_fit`"),
            *[(f"KL(paper form ‖ form) at the answer start, {{gate_fit.closeness.prompts}} held-out prompts: {label}",
               f"{{gate_fit.closeness.{key}:num3}}") for label, key in [
                ("unsteered", "unsteered"), ("gated LoRA", "gated.kl"),
                ("bias fold at its label-free scale {gate_fit.closeness.bias.scale:general}", "bias.kl")]]]),
        Para("Rows the file does not hold (not run to the end): {missing:join} (`missing`)."),
        gated_lora_tokens(512),
        gated_lora_tokens(256),
        Note("note")])

PLOTS = [("accuracy_vs_scale_answer_key_qwen1.5b.png",
          "0.5B -> 1.5B: the answer-start vectors' accuracy against scale on the held-out dev questions 200-263"),
         ("accuracy_vs_scale_qwen1.5b.png",
          "0.5B -> 1.5B: the last-token vectors' accuracy against the additive scale, first 64 questions"),
         ("diagnostics_qwen1.5b_to_0.5b.png",
          "1.5B -> 0.5B: per-layer key and vector norms, map R^2, cosine with the target's own key")]

UNTRACEABLE_GSM8K = [
    "0.5B -> 1.5B, the 1.5B's own answer-start key: \"its vectors are about 2-4 times the transferred ones' "
    "norms\" (neither set of per-layer vector norms is recorded for that direction).",
    "The fold recipe run end to end: 24 minutes, scale 0.4204, vectors within 1.4e-6 of the evaluated fold "
    "(largest element 5.7), verification at max |dlogit| 4.2e-5.",
    "64 questions, the last-token fold at 0.0884: mean output tokens 250, 81% cut and 22% \"the answer is\" on "
    "the first 64 (the file holds that run over 100 questions: 249.5, 82%, 26%; its first-64 count, 16, is "
    "derived in the 64-question table from its correct_indices).",
    "The 64-question paper form rerun after the end-of-text fix: mean output length 222 and 66% cut on the first "
    "64 (the file holds the 200-question rerun's figures and its correct_indices, which give the same 28 of the "
    "first 64).",
    "512 new tokens: the unsteered run's 8% \"the answer is\" (that run records states_answer_rate only).",
    "check-alpha: alpha 0.01 on the 1.5B (its table starts at 0.02) and the run times \"the 1.5B 4.5 min, the "
    "0.5B 1.5 min\".",
    "Preparation and tuning times: \"key and calibration about 16 min\" (1.5B self answer key), \"about 4 min\" "
    "(0.5B self answer key), \"about 50 min of tuning\", \"one command, about 34 minutes\" (reverse, 64 "
    "questions), \"each costing about 14 CPU minutes a row\".",
    "Speeds and cost estimates: 13 output tokens/s for the paper form alone, llama.cpp \"about 16 output "
    "tokens/s against 31 before\", \"about 8-9 CPU hours\" for the full table.",
    "Qualitative readings of the answers (\"most answers still open with 'To determine ...'\") beyond the "
    "recorded sample outputs and rates.",
]

GSM8K = Report("gsm8k-qwen2.5-coder.md", "GSM8K: Qwen2.5-Coder 0.5B <-> 1.5B",
               [FORWARD, REVERSE, BANDS, GATED, GATED_LORA], [
    Para(HOW_MADE),
    From(FORWARD, [FORWARD_SECTION], {**RUN_SIZES, "held_out_start": f"{TUNING}.questions[0] | 200",
                                      "held_out_stop": f"{TUNING}.questions[1] | 264"}),
    From(REVERSE, [REVERSE_SECTION], RUN_SIZES),
    From(GATED_LORA, [GATED_LORA_SECTION]),
    Section(2, "Plots", [Plots(PLOTS)]),
    Section(2, "Not traceable to a results file", [
        Para("Figures the README gave that no results file holds, so this report does not carry them:"),
        Bullets(UNTRACEABLE_GSM8K)])])


# -- the performance report -----------------------------------------------------------------------------------

RECORDS = {"records": "results | ."}   # a file's rows: under `results`, or the bare list of older files
RATIO = ["ratio", "value", "from"]
SETTING = ["setting", "value", "source"]


def ratio(a: str, b: str, figure: str, format: str) -> str:
    """A placeholder: `figure` of the record whose method is a, over that of the one whose method is b."""
    return f"{{records[method={a}].{figure} / records[method={b}].{figure}{format}}}"


UNTRACEABLE_PERFORMANCE = [
    "Serving: \"the differences are run-to-run noise on this shared 2-core machine, about +-5%\" (serve.json holds "
    "the medians only, not their spread).",
    "Export: \"--link costs about 2.4 s, almost all of it start-up\" (the 2.36 s is recorded; the start-up share "
    "is not measured).",
    "The engine-test figures (llama.cpp and vLLM agreement: cosine 0.9994, 6.3e-5, 1.03e-4, 7.3e-4 / 1.5e-3, "
    "<= 1e-4, about 0.4 in a logit on Q4_K_M): bounds checked by the test suite, not written to a results file.",
    "Durations of the make targets (\"make test\" one to two minutes, the engines' first build about 20-25 "
    "minutes).",
    "GPU figures: no results file holds a GPU measurement.",
]

PERFORMANCE = Report("performance.md", "Performance", [
    "capture.json", "capture_overhead.json", "end_to_end.json", "map_storage.json", "export.json", "serve.json"], [
    Para("Every figure is as the file records it, or a ratio of two recorded figures (named where it is given)."),
    From("capture.json", vars=RECORDS, body=[Section(2, "Capture: our hooks against the paper code's approach", [
        Table(["method", "model", "device", "layers", "prompts x tokens", "batch", "seconds", "tokens/s",
               "peak activation memory", "memory measured as", "source"],
              [Each("records", ["{.method:code}", "{.model:code}", "{.device}", "{.layers}",
                                "{.prompts} x {.tokens_per_prompt}", "{.batch}", "{.seconds:num2}",
                                "{.tokens_per_s:num}", "{.peak_activation_mib:num} MiB", "{.memory_measure}"])]),
        Table(RATIO, [
            ("peak activation memory, `reference` / `ours`", ratio("reference", "ours", "peak_activation_mib", ":num")
             + "x", "`peak_activation_mib` of both rows"),
            ("tokens/s, `ours` / `reference`", ratio("ours", "reference", "tokens_per_s", ":num2") + "x",
             "`tokens_per_s` of both rows"),
            ("peak activation memory, `reference-keep1` / `ours`",
             ratio("reference-keep1", "ours", "peak_activation_mib", ":num") + "x",
             "`peak_activation_mib` of both rows"),
            ("tokens/s, `ours` / `reference-keep1`", ratio("ours", "reference-keep1", "tokens_per_s", ":num2") + "x",
             "`tokens_per_s` of both rows"),
            ("tokens/s, `ours` / `plain`", ratio("ours", "plain", "tokens_per_s", ":num2") + "x",
             "`tokens_per_s` of both rows")])])]),
    From("capture_overhead.json", vars=RECORDS, body=[
        Section(2, "Capture overhead and early exit (interleaved repeats)", [
            Table(["method", "model", "prompts x tokens", "batch", "seconds (median)", "all runs (s)", "tokens/s",
                   "peak activation memory", "source"],
                  [Each("records", ["{.method:code}", "{.model:code}", "{.prompts} x {.tokens_per_prompt}", "{.batch}",
                                    "{.seconds:num2}", "{.seconds_all:nums2}", "{.tokens_per_s:num}",
                                    "{.peak_activation_mib:num} MiB"])]),
            Table(RATIO, [
                ("capture overhead: median seconds, ours / plain - 1", ratio("ours", "plain", "seconds", " - 1:signed"),
                 "`seconds` of both rows"),
                ("early exit: median seconds, ours-half / ours", ratio("ours-half", "ours", "seconds", ":pct0"),
                 "`seconds` of both rows")])])]),
    From("end_to_end.json", [Section(2, "End to end: the zoo recipe, stage by stage", when="timings_s", body=[
        Table(["stage", "seconds", "share", "source"], [
            Each("timings_s", ["{@:stage}", "{.:num}", "{. / sum(timings_s[*]):pct0}"]),
            ("stages total", "{stages_total_s:num | sum(timings_s[*]):num}", "100%", "`stages_total_s`")]),
        Table(SETTING, [("recipe", "{recipe}"), ("timings read from", "{from}"),
                        ("run_recipe wall time (s)", "{run_recipe_wall_s}"), ("CPU count", "{cpu_count}"),
                        ("machine", "{machine}"), ("device", "{device}")])])]),
    From("map_storage.json", vars=RECORDS, body=[
        Section(2, "Alignment map storage: low-rank factors against dense maps", [
            Table(["source -> target", "rank", "target layers", "d_s x d_t", "our factors", "dense maps (paper code)",
                   "smaller by", "source"],
                  [Each("records", ["{.source:basename} -> {.target:basename}", "{.rank}", "{.target_layers}",
                                    "{.d_s} x {.d_t}", "{.factor_bytes / 1048576:num} MiB",
                                    "{.dense_bytes / 1048576:num0} MiB", "{.dense_bytes / .factor_bytes:num}x"],
                        agree=[(".ratio", ".dense_bytes / .factor_bytes", 0.051)])],
                  caption="; MiB = bytes / 2^20")])]),
    From("export.json", [Section(2, "Export: fold of a sharded checkpoint against cp -r", when="[*].seconds", body=[
        Table(["checkpoint (random Llama shape, float32)", "value", "source"], [
            ("checkpoint size", "{checkpoint_bytes / 1073741824:num2} GiB"), ("shards", "{shards}"),
            ("largest shard", "{largest_shard_bytes / 1048576:num} MiB")]),
        Table(["command", "wall time", "peak RSS", "source"],
              [Each(".", ["{@:code}", "{.seconds:num2} s", "{.peak_rss_mib:num} MiB"], where=".seconds")]),
        Table(RATIO, [
            *[(f"wall time, {run} / cp -r", f'{{["{run}"].seconds / ["cp -r"].seconds:num2}}x', "`seconds` of both")
              for run in ("fold (copy)", "fold --link")],
            ("fold peak RSS / largest shard",
             '{["fold (copy)"].peak_rss_mib * 1048576 / largest_shard_bytes:num2}x')])])]),
    From("serve.json", [Section(2, "Serving speed in llama.cpp: unsteered, folded, control vector",
                                when="configs.unsteered", body=[
        Table(["configuration", "prompt tokens/s", "generation tokens/s", "prompt tokens",
               "vs unsteered (prompt / generation)", "source"],
              [Each("configs", ["{@:code}", "{.prompt_tok_s:num}", "{.gen_tok_s:num}", "{.prompt_tokens:general}",
                                "{.prompt_tok_s / configs.unsteered.prompt_tok_s:num2} / "
                                "{.gen_tok_s / configs.unsteered.gen_tok_s:num2}"],
                    agree=[(".prompt_vs_unsteered", ".prompt_tok_s / configs.unsteered.prompt_tok_s", 5.1e-5),
                           (".gen_vs_unsteered", ".gen_tok_s / configs.unsteered.gen_tok_s", 5.1e-5)])]),
        Table(SETTING, [("model", "{model}"), ("runs per configuration (median kept)", "{repeats}"),
                        ("prompt tokens requested", "{prompt_tokens_requested}"), ("generated tokens", "{gen_tokens}"),
                        ("threads", "{threads}")])])]),
    Section(2, "Not traceable to a results file", [
        Para("Figures and claims the README gave that no results file holds, so this report does not carry them:"),
        Bullets(UNTRACEABLE_PERFORMANCE)])])

REPORTS = [GSM8K, PERFORMANCE]


# -- the README's generated blocks ----------------------------------------------------------------------------

@dataclass
class Confirmation:
    results: str               # compare's results.json of a `--confirm` run, kept in reports/results/ by `keep`
    report: str                # compare's own rendering of it (render_report), in reports/
    kept: str                  # where its script keeps the answers of an unfinished run
    script: str                # the script that runs it
    title: str                 # the paragraph above its table
    labels: dict[str, str]     # arm name -> its label in the README (else the name)
    pending: str = ("The confirmation ({script}) is not finished; its answers so far are kept in "
                    "[reports/results/{kept}/](reports/results/{kept}/).")  # the block's text while it has no results


CONFIRM_FOLD = "**UNLOCK fold, the recorded choice** (answer-start key, label-free scale, patched GGUF)"
CONFIRMATIONS = [  # the README's confirmation block, in this order
    Confirmation(
        "confirm_gsm8k.json", "confirm-gsm8k.md", "confirm_gsm8k_answers", "`experiments/confirm_gsm8k.sh`",
        "**GSM8K** (the 400 questions of `builtin:gsm8k-confirm`; llama.cpp, direct prompt, greedy; 256 tokens "
        "scored on the 512-token answers' prefixes):",
        {"unsteered": "unsteered", "fold": CONFIRM_FOLD, "cot": "CoT prompt (the prompting baseline)",
         "gated": "gated LoRA (the paper form's last-token edit, label-free multiplier)"}),
    Confirmation(
        "confirm_math500.json", "confirm-math500.md", "confirm_math500_answers",
        "`experiments/confirm_math500.sh`",
        "**MATH-500, levels 1-2** (133 problems, answers in `\\boxed{}` scored by math-verify; llama.cpp, greedy; "
        "512 tokens scored on the 1024-token answers' prefixes):",
        {"unsteered": "unsteered", "fold": CONFIRM_FOLD, "cot": "CoT prompt (`math-cot`)"}),
]

DEMO = "demo.json"
DEMO_STAGES = [f"{label} {{timings_s.{stage}_s / 60:.1f}}" for stage, label in (
    ("key", "key"), ("align", "align"), ("diagnostics", "diagnostics"), ("calibrate", "label-free calibration"),
    ("fold", "fold with verification"), ("gguf", "GGUF files"))]   # those the file records, as {stages}
DEMO_SENTENCE = (
    "Measured by `python benchmarks/demo.py` on a {provenance.machine.cpu_count}-core machine ({conditions}; the zoo "
    "models already fetched{cache_note | \"\"}): {run_wall_s / 60:.1f} min (minutes: {stages}), peak memory "
    "{peak_rss_gib:.1f} GiB, {written_bytes / 1000000000:.2f} GB written; it picks the scale {scale:g} and writes "
    "the checkpoint in {weights_dtype}, verified at max |dlogit| {verification.max_abs_dlogit:.2g} (tolerance "
    "{verification.tolerance:.2g}: 0.001 plus the {weights_dtype} precision floor) "
    f"([reports/results/{DEMO}](reports/results/{DEMO})).")
