"""The serve commands the docs and the CLI print are true to the pinned engines, and run.

Every `llama-server` / `llama-cli` / `llama-completion` command line in README.md and docs/*.md (fenced
lines and inline code), and the ones `run` prints and `push` writes into cards, uses only flags the
pinned llama.cpp build lists in its `--help`, with as many values as the flag takes and in its format
(`--control-vector-scaled FNAME:SCALE` is one argument in recent builds; older ones took two). The
documented scaled command is then run: `--control-vector-scaled FILE:S` serves what a control vector
with S baked in (`cvec --scale S`) serves under plain `--control-vector`. And a control vector written
by gguf-py in repeng's layout, applied by llama.cpp, equals its fold as a GGUF.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from engines import engine_python, llama_bin, llama_cpp_src, llama_logits, llama_server
from test_interop import _directions, repeng_gguf

pytestmark = pytest.mark.engines

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LLAMA_TOOLS = ("llama-server", "llama-cli", "llama-completion")
TOL = 1e-4  # as tests/test_serve_llamacpp.py: tiny float32 models, F32 KV cache
N_PREDICT = 16
N_PROBS = 10


# -- command lines in the docs ----------------------------------------------------------------------
def _fragments(text: str) -> list[tuple[str, bool]]:
    """(fragment, fenced): each logical line of every fenced block (backslash continuations joined,
    `# comments` cut) and each inline code span (which may wrap over a line break)."""
    out: list[tuple[str, bool]] = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            out.append((re.split(r"\s+#", line)[0].strip(), True))
    prose = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        if "\n\n" not in span:
            out.append((" ".join(span.split()), False))
    return out


def _split(fragment: str) -> list[str]:
    try:
        tokens = shlex.split(fragment)
    except ValueError:
        tokens = fragment.split()
    for i, tok in enumerate(tokens):  # one command: stop at a pipe or a second command
        if tok in {"|", "||", "&&", ";"}:
            return tokens[:i]
    return tokens


def commands(text: str, programs: tuple[str, ...]) -> list[tuple[list[str], bool]]:
    """(argv, fenced) of every fragment of TEXT that starts with one of PROGRAMS."""
    found = []
    for fragment, fenced in _fragments(text):
        tokens = _split(fragment)
        if tokens and tokens[0].split("/")[-1] in programs:
            found.append((tokens, fenced))
    return found


def doc_commands(programs: tuple[str, ...]) -> list[tuple[str, list[str], bool]]:
    """(where, argv, fenced) in README.md, docs/*.md, the serve commands `run` prints and the cards
    `push` writes."""
    from unlock_export.export.hub import _single_file_card
    from unlock_export.export.serving import serve_commands

    found = [(path.relative_to(REPO).as_posix(), argv, fenced)
             for path in DOCS for argv, fenced in commands(path.read_text(), programs)]
    printed = serve_commands("out/model", "out/model.gguf", "out/control-vector.gguf", "target.gguf")
    found += [("export/serving.py", argv, True) for row in printed for argv, _ in commands(f"`{row.command}`", programs)]
    for kind in ("control-vector", "gguf"):
        card = _single_file_card(Path("steer.gguf"), kind, None)
        found += [(f"export/hub.py ({kind} card)", argv, True) for argv, _ in commands(card, programs)]
    return found


# -- the pinned llama.cpp build's options --------------------------------------------------------------
@lru_cache(maxsize=None)
def llama_options(tool: str) -> dict[str, str]:
    """Every option name in `TOOL --help` of the pinned build -> its value placeholder ('' for none)."""
    proc = subprocess.run([str(llama_bin(tool)), "--help"], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    options: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if not line.startswith("-") or line.startswith("---"):
            continue
        tokens = re.split(r"\s{2,}", re.sub(r",\s+", ", ", line.strip()), maxsplit=1)[0].split()
        names = []
        for i, tok in enumerate(tokens):  # "-n,    --predict, --n-predict N": names end at one without a comma
            names.append(tok.rstrip(","))
            if not tok.endswith(","):
                break
        metavar = " ".join(tokens[len(names):])
        options.update(dict.fromkeys(names, metavar))
    return options


def _arity(metavar: str) -> tuple[int, int]:
    """(least, most) values an option takes, from its placeholder."""
    if not metavar:
        return 0, 0
    if metavar.startswith("["):
        return 0, 1
    if "<" in metavar:  # "<tensor name pattern>=<buffer type>,...": one argument with spaces in its name
        return 1, 1
    return len(metavar.split()), len(metavar.split())


def llama_command_problems(argv: list[str], options: dict[str, str], mention: bool) -> list[str]:
    """What the pinned build would refuse in ARGV. MENTION: prose naming a flag (`llama-completion
    --control-vector`), whose last flag may stand without its value."""
    problems, i = [], 1
    while i < len(argv):
        flag = argv[i]
        if not flag.startswith("-"):
            problems.append(f"stray argument {flag!r} (llama.cpp tools take no positional arguments)")
            i += 1
            continue
        if flag not in options:
            problems.append(f"unknown option {flag}")
            i += 1
            continue
        least, most = _arity(options[flag])
        values = []
        while len(values) < most and i + 1 + len(values) < len(argv) and \
                not argv[i + 1 + len(values)].startswith("--"):
            values.append(argv[i + 1 + len(values)])
        if len(values) < least and not (mention and i + 1 + len(values) == len(argv)):
            problems.append(f"{flag} takes {options[flag]}, got {values}")
        for part, value in zip(options[flag].split(), values):
            if re.match(r"^[A-Z]+:[A-Z]+", part) and ":" not in value:  # FNAME:SCALE,...
                problems.append(f"{flag} takes one argument {part} (FILE:SCALE), got {value!r}")
        i += 1 + len(values)
    return problems


def test_every_llama_cpp_command_uses_the_pinned_builds_flags():
    found = doc_commands(LLAMA_TOOLS)
    assert len(found) >= 8, found  # README's table, serving.md, commands.md, file-formats.md, serving.py, hub.py
    problems = []
    for where, argv, fenced in found:
        for problem in llama_command_problems(argv, llama_options(argv[0].split("/")[-1]), mention=not fenced):
            problems.append(f"{where}: `{shlex.join(argv)}`: {problem}")
    assert not problems, "\n".join(problems)
    scaled = [argv for _, argv, _ in found if "--control-vector-scaled" in argv]
    assert scaled, "the docs show the scaled control vector"


def test_the_flag_checker_catches_the_two_argument_spelling():
    options = llama_options("llama-server")
    assert options["--control-vector-scaled"].startswith("FNAME:SCALE")
    old = ["llama-server", "-m", "target.gguf", "--control-vector-scaled", "steer.gguf", "2"]
    assert len(llama_command_problems(old, options, mention=False)) == 2  # no ':' in the file, and a stray 2
    assert llama_command_problems(["llama-server", "--control-vector-layer-range", "1", "3"], options, False) == []
    assert llama_command_problems(["llama-server", "--control-vector-range", "1"], options, False)
    # and the pinned build itself refuses the old spelling before it loads anything
    proc = subprocess.run([str(llama_bin("llama-server")), *old[1:]], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode != 0 and "FNAME:SCALE" in proc.stdout + proc.stderr


# -- vLLM ---------------------------------------------------------------------------------------------
VLLM_PROGRAMS = ("vllm", "python")


def test_every_vllm_command_uses_the_pinned_builds_flags():
    """`vllm serve FOLDER ...` and `python -m vllm.entrypoints.openai.api_server ...`: every option is in
    the pinned vLLM's server --help, and a value with listed choices is one of them."""
    proc = subprocess.run([str(engine_python("vllm")), "-m", "vllm.entrypoints.openai.api_server", "--help=all"],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    options: dict[str, str] = {}
    for m in re.finditer(r"^  (-[-\w]+(?:, -[-\w]+)*)(?: ([^\s].*?))?(?:\s{2,}|$)", proc.stdout, flags=re.M):
        options.update(dict.fromkeys(m.group(1).split(", "), m.group(2) or ""))
    assert "--dtype" in options and "--model-impl" in options
    found = [(w, a, f) for w, a, f in doc_commands(VLLM_PROGRAMS)
             if a[:2] == ["vllm", "serve"] or a[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]]
    assert len(found) >= 4, found
    problems = []
    for where, argv, _ in found:
        rest = argv[2:] if argv[0] == "vllm" else argv[3:]
        positional = 0
        i = 0
        while i < len(rest):
            tok = rest[i]
            if not tok.startswith("-"):
                positional += 1
                i += 1
                continue
            name, _, inline = tok.partition("=")
            metavar = options.get(name)
            if metavar is None:
                problems.append(f"{where}: `{shlex.join(argv)}`: unknown option {name}")
                i += 1
                continue
            value = inline or (rest[i + 1] if metavar and i + 1 < len(rest) else None)
            choices = re.findall(r"[\w.-]+", metavar) if metavar[:1] in "{[" else []
            if choices and value not in choices:
                problems.append(f"{where}: `{shlex.join(argv)}`: {name} {value!r} is not one of {choices}")
            i += 1 + (1 if metavar and not inline else 0)
        if positional > 1:
            problems.append(f"{where}: `{shlex.join(argv)}`: more than one model")
    assert not problems, "\n".join(problems)


# -- running them -----------------------------------------------------------------------------------
@contextmanager
def greedy_server(argv: list[str], log: Path):
    """llama_server (tests/engines.py) yielding a function that posts greedy /completion requests."""
    with llama_server(argv, log) as post:
        yield lambda prompt_ids: post("/completion", {
            "prompt": prompt_ids, "n_predict": N_PREDICT, "temperature": 0, "top_k": 1, "n_probs": N_PROBS,
            "ignore_eos": True, "cache_prompt": False, "seed": 0, "return_tokens": True})


def served_text(argv: list[str], prompts: list[list[int]], log: Path) -> list[dict]:
    """Greedy tokens, text and the top-N log-probabilities at each generated token, per prompt."""
    with greedy_server(argv, log) as complete:
        answers = [complete(ids) for ids in prompts]
    out = []
    for answer in answers:
        steps = answer["completion_probabilities"]
        assert len(steps) == N_PREDICT, answer
        out.append({"text": answer["content"], "tokens": [s["id"] for s in steps],
                    "top": [{t["id"]: t["logprob"] for t in s["top_logprobs"]} for s in steps]})
    return out


def logprob_gap(a: list[dict], b: list[dict]) -> float:
    """Largest |dlogprob| over the top tokens of two runs that must agree: the same greedy tokens and
    the same top-N token ids at every generated position."""
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    gap = 0.0
    for x, y in zip(a, b):
        for tx, ty in zip(x["top"], y["top"]):
            assert tx.keys() == ty.keys(), (sorted(tx), sorted(ty))
            gap = max([gap] + [abs(tx[k] - ty[k]) for k in tx])
    return gap


def tokens_moved(a: list[dict], b: list[dict]) -> int:
    """Generated positions (of all prompts) whose greedy token differs between two runs."""
    return sum(x != y for ra, rb in zip(a, b) for x, y in zip(ra["tokens"], rb["tokens"]))


@pytest.fixture(scope="module")
def served_llama(served_tiny):
    """served_tiny("llama") plus `base`, its float32 GGUF from llama.cpp's converter."""
    from unlock_export.export.gguf import convert_gguf

    m = served_tiny("llama")
    if "base" not in m:
        m["base"] = m["root"] / "base-f32.gguf"
        convert_gguf(m["dir"], m["base"], llama_cpp=llama_cpp_src(), outtype="f32")
    return m


def _documented_scaled_command() -> list[str]:
    found = [argv for where, argv, _ in doc_commands(("llama-server",))
             if where == "docs/serving.md" and "--control-vector-scaled" in argv and "-m" in argv]
    assert len(found) == 1, found
    return found[0]


def test_the_documented_scaled_control_vector_equals_the_scale_baked_in(served_llama, tmp_path, capsys):
    """docs/serving.md's `llama-server -m target.gguf --control-vector-scaled steer.gguf:S2`, run as
    written (its paths and scale filled in): the same greedy tokens and log-probabilities as
    `cvec --scale S2` under `--control-vector`, and not those of the unscaled vector."""
    from unlock_export.cli import main

    m, scale = served_llama, 2.5
    vec_path = m["vectors"].save(tmp_path / "v.safetensors")
    files = {}
    for name, s in [("steer", 1.0), ("baked", scale)]:
        files[name] = tmp_path / f"{name}.gguf"
        assert main(["--quiet", "cvec", "--vectors", str(vec_path), "--scale", str(s), "--layers", "1-3",
                     "-o", str(files[name])]) == 0, capsys.readouterr().err
    documented = _documented_scaled_command()
    argv = []
    for i, tok in enumerate(documented[1:], start=1):
        if documented[i - 1] == "-m":
            tok = str(m["base"])
        elif documented[i - 1] == "--control-vector-scaled":
            assert tok.count(":") == 1, tok
            tok = f"{files['steer']}:{scale:g}"
        argv.append(tok)
    assert argv == ["-m", str(m["base"]), "--control-vector-scaled", f"{files['steer']}:{scale:g}"]

    t0 = time.monotonic()
    scaled = served_text(argv, m["ids"], tmp_path / "scaled.log")
    baked = served_text(["-m", str(m["base"]), "--control-vector", str(files["baked"])], m["ids"],
                        tmp_path / "baked.log")
    unscaled = served_text(["-m", str(m["base"]), "--control-vector", str(files["steer"])], m["ids"],
                           tmp_path / "unscaled.log")
    same, moved = logprob_gap(scaled, baked), tokens_moved(scaled, unscaled)
    print(f"scaled vs baked: max |dlogprob| {same:.3g}; scaled vs unscaled: {moved} of "
          f"{N_PREDICT * len(m['ids'])} greedy tokens differ ({time.monotonic() - t0:.1f} s for three servers)")
    assert [r["text"] for r in scaled] == [r["text"] for r in baked]
    assert same <= TOL
    assert moved >= 2, "the scale must change the greedy text for this test to mean anything"


def test_a_repeng_control_vector_in_llama_cpp_equals_its_folded_gguf(served_llama, tmp_path, capsys):
    """A control vector written by gguf-py in repeng's layout (not this package's writer), applied by
    llama.cpp to the unsteered GGUF, equals `fold --vectors steer.gguf --scale 1` then `gguf`: logits at
    every prompt position through the binding (llama_set_adapter_cvec), and greedy tokens and
    log-probabilities through `llama-server --control-vector` (llama.cpp's own control-vector loader)."""
    from unlock_export.cli import main

    m = served_llama
    steer = repeng_gguf(tmp_path / "steer.gguf", {k: 2 * v for k, v in _directions(64).items()}, model_hint="llama")
    folded = tmp_path / "folded"
    assert main(["--quiet", "fold", str(m["dir"]), "--vectors", str(steer), "--scale", "1", "-o", str(folded)]) == 0, \
        capsys.readouterr().err
    folded_gguf = tmp_path / "folded.gguf"
    assert main(["--quiet", "gguf", str(folded), "--base", str(m["base"]), "-o", str(folded_gguf)]) == 0, \
        capsys.readouterr().err

    t0 = time.monotonic()
    plain = llama_logits(m["base"], m["ids"], tmp_path / "plain")
    with_cvec = llama_logits(m["base"], m["ids"], tmp_path / "cvec", cvec=steer, generate=8)
    from_fold = llama_logits(folded_gguf, m["ids"], tmp_path / "fold", generate=8)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(with_cvec["logits"], from_fold["logits"]))
    effect = max(float(np.abs(a - b).max()) for a, b in zip(plain["logits"], from_fold["logits"]))
    t1 = time.monotonic()
    served_cvec = served_text(["-m", str(m["base"]), "--control-vector", str(steer)], m["ids"], tmp_path / "c.log")
    served_fold = served_text(["-m", str(folded_gguf)], m["ids"], tmp_path / "f.log")
    served_plain = served_text(["-m", str(m["base"])], m["ids"], tmp_path / "p.log")
    served_gap, served_moved = logprob_gap(served_cvec, served_fold), tokens_moved(served_plain, served_fold)
    print(f"repeng cvec vs folded GGUF: binding max |dlogit| {diff:.3g} (steering effect {effect:.3g}, "
          f"{t1 - t0:.1f} s); llama-server max |dlogprob| {served_gap:.3g} (unsteered: {served_moved} of "
          f"{N_PREDICT * len(m['ids'])} greedy tokens differ, {time.monotonic() - t1:.1f} s)")
    assert with_cvec["cvec_layers"] == [1, 2, 3]
    assert diff <= TOL, f"max |dlogit| {diff:.3g} (steering effect {effect:.3g})"
    assert effect > 0.1, "the vector must move the logits for this test to mean anything"
    assert with_cvec["continuations"] == from_fold["continuations"]
    assert [r["text"] for r in served_cvec] == [r["text"] for r in served_fold]
    assert served_gap <= 2 * TOL  # a log-probability moves by at most twice the largest logit change
    assert served_moved >= 2, "the vector must change the served text for this test to mean anything"
