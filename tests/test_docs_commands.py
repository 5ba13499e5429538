"""Every command the documentation shows is one the code accepts, so none goes stale.

The commands are taken from README.md and docs/*.md (not docs/experiments/,
whose reports quote the commands they were made with): every line of a
fenced code block (``bash``, ``sh``, ``console`` or no language; ``mermaid``
and other languages are diagrams or data, not commands), lines ending in a
backslash joined, ``#`` comments dropped, and every inline code span that
starts like a command. Recognised commands, wherever they start on a line:

- ``python -m MODULE ARGS`` (any ``.../python``, ``python3``): a module of this
  project (``schemas``, ``beam_pipelines``, ``spark_jobs``, ``trainer``,
  ``adaptive_transfer``, ``benchmarks``; others, e.g. ``pip``, are not ours);
- ``adaptive-transfer COMMAND ARGS``: the command exists
  (``adaptive_transfer.cli.COMMANDS``) and ARGS are checked as its module's;
- ``make TARGET... [NAME=VALUE...]``: every target is a rule of the
  Makefile, every variable one the Makefile reads or sets;
- ``... spark_jobs/submit.py JOB ARGS`` (after ``spark-submit`` options,
  which are Spark's and not checked here): JOB is one of ``submit.JOBS``;
- ``deepspeed LAUNCHER_OPTIONS --module MODULE ARGS``: the launcher's own
  parser accepts its options, and ARGS are checked as MODULE's.

ARGS are checked with the parser the module's ``main`` builds (the module's
``build_parser()`` where it has one; caught as ``main`` calls
``parse_args``/``parse_known_args``, before any work): they must parse, and
every ``--flag`` must be the parser's own spelling, exactly (not an
abbreviation) and not a deprecated alias (old spellings belong in
docs/stages.md's "Renamed flags" table, outside code blocks). Where
``main`` passes unknown arguments on to Beam (``parse_known_args``), those
must be Beam pipeline options (the option classes Beam and this project
define). Values are not looked up: ``IDX``, ``gs://B/...`` are fine, but a
typed option needs a value of its type (``--steps 2000000``, not ``--steps
N``), and a choice one of its choices.

Placeholders in the text:

- ``[ ... ]`` (a token starting with ``[``, up to the matching ``]``) is an
  optional part: it is parsed, not stripped, so its flags are checked too;
  ``[A | B]`` gives alternatives, each checked in turn;
- ``a|b|c`` as a value (of ``--flag``, or ``NAME=`` for make) gives
  alternatives, each checked in turn (``...`` among them is dropped);
- ``...`` elides the rest: such a command, and every inline span, is
  checked without requiring the parser's required flags.

Besides: relative links lead to a file (and heading); README.md stays a
first page (length, the pipeline's flowchart, a link to every docs page);
docs/stages.md's "Renamed flags" table is exactly the aliases the parsers
accept.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The documentation whose commands are checked.
DOC_FILES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
#: Modules of this project (a ``python -m`` of anything else is not checked).
PROJECT_PACKAGES = ("schemas", "beam_pipelines", "spark_jobs", "trainer", "adaptive_transfer", "benchmarks")
#: Fenced blocks whose lines are commands (by the fence's language).
SHELL_FENCES = ("", "bash", "sh", "shell", "console")
#: Tokens that end a command on a line.
SEPARATORS = {"&&", "||", ";", "&", ">", ">>", "2>", "2>&1", "<", "|&"}
ELISION = "..."
#: A line without one of these holds no command (layouts, output in a plain block).
COMMAND_WORD = re.compile(r"(python[\d.]*\s+-m\s|adaptive-transfer|\bmake\b|\bdeepspeed\b|spark_jobs/submit\.py)")


# -- extraction ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DocCommand:
    """One command as the documentation shows it."""

    file: str
    line: int
    kind: str  # "module", "cli", "make", "submit", "deepspeed"
    tokens: tuple[str, ...]  # from the command's name on, placeholders still in
    inline: bool  # an inline code span (checked without required flags)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


def _strip_comment(line: str) -> str:
    """``line`` without a shell comment: a ``#`` that starts a word outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _fenced_lines(text: str):
    """(line number, logical line) of every shell fenced block: continuation
    lines joined, comments dropped."""
    fence, language, pending, start = None, "", "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if fence is None:
            m = re.match(r"^(```+|~~~+)\s*([\w+-]*)", stripped)
            if m:
                fence, language = m.group(1), m.group(2).lower()
            continue
        if stripped.startswith(fence) and stripped.strip("`~") == "":
            fence = None
            continue
        if language not in SHELL_FENCES:
            continue
        line = _strip_comment(raw).rstrip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def _inline_spans(text: str):
    """(line number, span) of every inline code span outside fenced blocks."""
    fenced = False
    for number, raw in enumerate(text.splitlines(), 1):
        if re.match(r"^\s*(```|~~~)", raw):
            fenced = not fenced
            continue
        if fenced:
            continue
        for m in re.finditer(r"(?<!`)`([^`\n]+)`(?!`)", raw):
            yield number, m.group(1)


def _is_python(token: str) -> bool:
    return re.fullmatch(r"(\S*/)?python(3(\.\d+)?)?", token) is not None


def _bracket_delta(token: str) -> int:
    """Optional parts a token opens (leading ``[``) less those it closes
    (``]`` beyond its own brackets, as in ``local[*]]``)."""
    body = token.lstrip("[")
    opened = len(token) - len(body)
    return opened - max(0, body.count("]") - body.count("["))


def _commands_in(tokens: list[str]):
    """(kind, tokens from the command's name to its end) of every recognised command."""
    i = 0
    while i < len(tokens):
        t = tokens[i]
        kind, start = None, i
        if _is_python(t) and tokens[i + 1:i + 2] == ["-m"] and i + 2 < len(tokens):
            if tokens[i + 2].split(".")[0] in PROJECT_PACKAGES:
                kind, start = "module", i + 2
        elif t == "adaptive-transfer":
            kind = "cli"
        elif t == "make":
            kind = "make"
        elif t == "deepspeed":
            kind = "deepspeed"
        elif t.endswith("spark_jobs/submit.py"):
            kind = "submit"
        if kind is None:
            i += 1
            continue
        end, depth = start + 1, 0
        while end < len(tokens):
            tok = tokens[end]
            if tok in SEPARATORS or (tok == "|" and depth <= 0):
                break
            depth += _bracket_delta(tok)
            end += 1
        yield kind, tokens[start:end]
        i = end + 1


def extract(file: str, text: str | None = None) -> list[DocCommand]:
    """Every recognised command of documentation file ``file`` (relative to the repository)."""
    if text is None:
        with open(os.path.join(ROOT, file), encoding="utf-8") as fh:
            text = fh.read()
    found = []
    sources = [(n, line, False) for n, line in _fenced_lines(text)]
    sources += [(n, span, True) for n, span in _inline_spans(text)]
    for number, line, inline in sources:
        if not COMMAND_WORD.search(line):
            continue
        try:
            tokens = shlex.split(line)
        except ValueError as e:
            if inline:
                continue  # prose in backticks, not a command
            raise ValueError(f"{file}:{number}: cannot split {line!r}: {e}") from None
        if inline and len(tokens) < 2:
            continue  # a tool's bare name in prose (`deepspeed`), not a command
        if inline and not (tokens[0] in ("adaptive-transfer", "make", "deepspeed") or _is_python(tokens[0])):
            continue  # an inline span is a command only from its first word
        for kind, command in _commands_in(tokens):
            found.append(DocCommand(file, number, kind, tuple(command), inline))
    return found


# -- placeholders: optional parts and alternatives ------------------------------------------------

def _tree(tokens: list[str]) -> list:
    """Tokens as a tree: a group (``[ ... ]``) is a list of alternatives, each a list of nodes."""
    root: list = []
    stack: list[list[list]] = []  # open groups: their alternatives

    def current() -> list:
        return stack[-1][-1] if stack else root

    for tok in tokens:
        while tok.startswith("["):
            stack.append([[]])
            tok = tok[1:]
        if not tok:
            continue
        closing = tok.count("]") - tok.count("[")
        if closing > 0 and stack:
            closing = min(closing, len(stack))
            body = tok[:len(tok) - closing] if tok.endswith("]" * closing) else tok
            if body == "|":
                stack[-1].append([])
            elif body:
                current().append(body)
            for _ in range(closing):
                group = stack.pop()
                current().append(group)
            continue
        if tok == "|" and stack:
            stack[-1].append([])
            continue
        current().append(tok)
    while stack:  # an unclosed group: keep what it holds
        group = stack.pop()
        current().append(group)
    return root


def _width(nodes: list) -> int:
    """How many variants the tree needs (the most alternatives anywhere)."""
    width = 1
    for node in nodes:
        if isinstance(node, list):
            width = max(width, len(node), *(_width(alt) for alt in node))
        else:
            width = max(width, len(_value_alternatives(node)))
    return width


def _value_alternatives(token: str) -> list[str]:
    """``a|b|c`` as a value: each alternative (``...`` dropped); a flag is not split."""
    head, value = "", token
    m = re.match(r"^(--[\w-]+=|[A-Za-z_][A-Za-z0-9_]*=)(.*)$", token)
    if m:
        head, value = m.group(1), m.group(2)
    elif token.startswith("-"):
        return [token]
    if "|" not in value:
        return [token]
    alternatives = [a for a in value.split("|") if a != ELISION]
    return [head + a for a in alternatives] or [token]


def _variant(nodes: list, i: int) -> list[str]:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, list):
            out += _variant(node[min(i, len(node) - 1)], i)
        else:
            alternatives = _value_alternatives(node)
            out.append(alternatives[min(i, len(alternatives) - 1)])
    return out


def variants(tokens: list[str]) -> tuple[list[list[str]], bool]:
    """Every argv the placeholders stand for, and whether the command is elided."""
    tree = _tree(tokens)
    argvs = [_variant(tree, i) for i in range(_width(tree))]
    elided = any(ELISION in argv for argv in argvs)
    argvs = [[t for t in argv if t != ELISION] for argv in argvs]
    unique = []
    for argv in argvs:
        if argv not in unique:
            unique.append(argv)
    return unique, elided


# -- checking ------------------------------------------------------------------------------------

class _Caught(Exception):
    def __init__(self, parser: argparse.ArgumentParser, known: bool):
        super().__init__("parser caught")
        self.parser, self.known = parser, known


@contextlib.contextmanager
def _catch_parsers():
    """While inside, the first ``parse_args``/``parse_known_args`` of any
    argparse parser raises :class:`_Caught` with the parser, instead of parsing."""
    base = argparse.ArgumentParser
    parse_args, parse_known_args = base.parse_args, base.parse_known_args

    def caught_parse_args(self, args=None, namespace=None):
        raise _Caught(self, known=False)

    def caught_parse_known_args(self, args=None, namespace=None):
        raise _Caught(self, known=True)

    base.parse_args, base.parse_known_args = caught_parse_args, caught_parse_known_args
    try:
        yield
    finally:
        base.parse_args, base.parse_known_args = parse_args, parse_known_args


def parser_of(main) -> _Caught:
    """The parser ``main`` builds, and whether it keeps unknown arguments (for Beam)."""
    with _catch_parsers():
        try:
            main(["--help"])
        except _Caught as caught:
            return caught
    raise AssertionError(f"{main.__module__}.main returned without parsing its command line")


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _all_parsers(sub)
    return found


def _flag_problems(parser: argparse.ArgumentParser, argv: list[str], beam: set[str] | None) -> list[str]:
    """Flags that are not the parser's own exact spelling, or are deprecated aliases."""
    from schemas.cli import DeprecatedAlias

    actions = {}
    for p in _all_parsers(parser):
        actions.update(p._option_string_actions)
    problems = []
    for tok in argv:
        if tok == "--":
            break
        if not tok.startswith("-") or re.fullmatch(r"-\d.*", tok):
            continue
        flag = tok.split("=", 1)[0]
        action = actions.get(flag)
        if action is None:
            if beam is not None and flag in beam:
                continue
            problems.append(f"{flag}: not a flag of {parser.prog}")
        elif isinstance(action, DeprecatedAlias):
            problems.append(f"{flag}: a deprecated alias of {action.new} (use {action.new})")
    return problems


def _relax(parser: argparse.ArgumentParser) -> None:
    """No flag required (an elided command shows only some)."""
    for p in _all_parsers(parser):
        for action in p._actions:
            action.required = False
        if hasattr(p, "_aliased_required"):
            p._aliased_required = []


def _beam_options() -> argparse.ArgumentParser:
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    import beam_pipelines.target_histogram  # noqa: F401  (this project's InferenceOptions)

    parser = _BeamArgumentParser(allow_abbrev=False)
    classes = {}
    for cls in PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str], known: bool) -> tuple[str | None, list[str]]:
    """(the parser's error or ``None``, unknown arguments kept for Beam)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if known:
                return None, parser.parse_known_args(argv)[1]
            parser.parse_args(argv)
            return None, []
        except SystemExit as e:
            if e.code == 0:
                return None, []  # --help
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}", []


def check_main(main, argv: list[str], elided: bool) -> list[str]:
    """Problems of ``argv`` for the command line of ``main``."""
    caught = parser_of(main)
    parser = caught.parser
    if elided:
        _relax(parser)
    beam = None
    if caught.known:
        beam_parser = _beam_options()
        beam = set(beam_parser._option_string_actions)
    problems = _flag_problems(parser, argv, beam)
    if problems:
        return problems
    error, unknown = _parse(parser, argv, caught.known)
    if error:
        return [error]
    if unknown:
        rest = beam_parser.parse_known_args(unknown)[1]
        if rest:
            return [f"not flags of {parser.prog} nor Beam pipeline options: {rest}"]
    return []


def check_module(module: str, argv: list[str], elided: bool) -> list[str]:
    if importlib.util.find_spec(module) is None:
        return [f"no module {module}"]
    mod = importlib.import_module(module)
    main = getattr(mod, "main", None)
    if main is None:
        return [f"{module} has no main(argv)"]
    return check_main(main, argv, elided)


def check_cli(argv: list[str], elided: bool) -> list[str]:
    from adaptive_transfer.cli import COMMANDS

    if not argv or argv[0] in ("-h", "--help"):
        return []
    if argv[0] not in COMMANDS:
        return [f"adaptive-transfer has no command {argv[0]!r} (commands: {', '.join(COMMANDS)})"]
    return check_module(COMMANDS[argv[0]][0], argv[1:], elided)


def makefile() -> tuple[set[str], set[str]]:
    """The Makefile's rule targets and the variables it sets or reads."""
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as fh:
        text = fh.read()
    targets, variables = set(), set()
    for line in text.splitlines():
        if line.startswith(("\t", "#")) or not line.strip():
            continue
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(\?|:|\+|::)?=", line)
        if m:
            variables.add(m.group(1))
            continue
        m = re.match(r"^([^:=#]+?)\s*::?(?!=)", line)
        if m:
            targets.update(t for t in m.group(1).split() if "$" not in t)
    variables.update(re.findall(r"\$[({]([A-Za-z_][A-Za-z0-9_]*)[)}]", text))
    return targets, variables


def check_make(argv: list[str]) -> list[str]:
    targets, variables = makefile()
    problems = []
    for tok in argv:
        if tok.startswith("-"):
            continue
        if "=" in tok:
            name = tok.split("=", 1)[0]
            if name not in variables:
                problems.append(f"make variable {name}: the Makefile neither sets nor reads it")
        elif tok not in targets:
            problems.append(f"make target {tok}: no such rule in the Makefile")
    return problems


def check_submit(argv: list[str], elided: bool) -> list[str]:
    from spark_jobs import submit

    if not argv:
        return ["spark_jobs/submit.py without a job"]
    job, rest = argv[0], argv[1:]
    if job not in submit.JOBS:
        return [f"spark_jobs/submit.py has no job {job!r} (jobs: {', '.join(submit.JOBS)})"]
    if job == "check-env":
        return [f"check-env takes no arguments, got {rest}"] if rest else []
    return check_main(submit.JOBS[job], rest, elided)


def check_deepspeed(argv: list[str], elided: bool) -> list[str]:
    pytest.importorskip("deepspeed")
    from deepspeed.launcher import runner

    if "--module" not in argv:
        return ["deepspeed without --module (the trainer runs as a module)"]
    cut = argv.index("--module")
    launcher, module, rest = argv[:cut], argv[cut + 1] if cut + 1 < len(argv) else "", argv[cut + 2:]
    caught = parser_of(lambda args: runner.parse_args(args))
    problems = _flag_problems(caught.parser, launcher, None)
    error, _ = _parse(caught.parser, [*launcher, "--module", module or "x"], known=False)
    problems += [f"deepspeed launcher: {error}"] if error else []
    if not module.split(".")[0] in PROJECT_PACKAGES:
        return problems + [f"deepspeed --module {module!r}: not a module of this project"]
    return problems + check_module(module, rest, elided)


def check(command: DocCommand) -> list[str]:
    """Every problem of a documented command (empty: the code accepts it)."""
    argvs, elided = variants(list(command.tokens[1:]))
    elided = elided or command.inline
    problems = []
    for argv in argvs:
        if command.kind == "module":
            found = check_module(command.tokens[0], argv, elided)
        elif command.kind == "cli":
            found = check_cli(argv, elided)
        elif command.kind == "make":
            found = check_make(argv)
        elif command.kind == "submit":
            found = check_submit(argv, elided)
        else:
            found = check_deepspeed(argv, elided)
        problems += [p for p in found if p not in problems]
    return problems


# -- the tests -----------------------------------------------------------------------------------

ALL = [c for f in DOC_FILES for c in extract(f)]


@pytest.mark.parametrize("command", ALL, ids=[f"{c.where}:{c.tokens[0]}" for c in ALL])
def test_documented_command_is_accepted(command: DocCommand):
    assert check(command) == [], f"{command.where}: {command.text}"


def test_the_documentation_shows_every_kind_of_command():
    """The extraction finds the commands (a broken extraction would check nothing)."""
    readme = [c for c in ALL if c.file == "README.md" and not c.inline]
    assert {c.kind for c in readme} >= {"module", "cli", "make"}, readme
    assert {c.kind for c in ALL} == {"module", "cli", "make", "submit", "deepspeed"}
    assert len([c for c in ALL if not c.inline]) >= 40
    for doc in ("docs/stages.md", "docs/scale.md", "docs/training.md", "docs/outputs.md"):
        assert any(c.file == doc for c in ALL), f"{doc}: no command found"


BROKEN = """
```bash
python -m spark_jobs.verify S --no-such-flag
python -m beam_pipelines.importance_weights --source-index IDX --labels L --checkpoint G --output W
python -m spark_jobs.resample --index IDX --size 80M --output R --matcher same|closest
python -m adaptive_transfer.demo --out D --size 6000
python -m trainer.pretrain --shards S/manifest.json --labels L --steps N --batch-size 1024 --output P
python -m trainer.finetune --target-root T --init P/generalist.pt --steps 100 --output F [--overwrit]
python -m beam_pipelines.near_duplicates --index IDX --labels L --output D --runner DirectRunner --no_such_beam 1
python -m trainer.no_such_module --x 1
adaptive-transfer no-such-stage --x 1
adaptive-transfer shards --selection R --index IDX
make no-such-target
make resample TARGET=demo SIZE=5000 NO_SUCH_VARIABLE=1
spark-submit --master yarn spark_jobs/submit.py no_such_job --x 1
spark-submit --master yarn spark_jobs/submit.py write_shards --selection R --index IDX --output S --no-such
deepspeed --no_such_launcher_flag 1 --module trainer.pretrain --shards S --labels L --steps 1 --batch-size 8 --output P
```
"""


def test_the_checker_refuses_what_the_code_does_not_accept():
    """Each line above has one thing the code does not accept (an unknown or
    deprecated flag, a bad choice, a missing required flag, an untyped value,
    an unknown module, command, target, variable or job): each is reported."""
    commands = extract("BROKEN.md", BROKEN)
    assert len(commands) == 15
    reported = {c.text: check(c) for c in commands}
    assert [text for text, problems in reported.items() if not problems] == []
    joined = "\n".join(p for problems in reported.values() for p in problems)
    for expected in ("--no-such-flag: not a flag", "--source-index: a deprecated alias of --index",
                     "invalid choice: 'closest'", "--out: a deprecated alias of --output",
                     "invalid int value: 'N'", "--overwrit: not a flag", "no_such_beam",
                     "no module trainer.no_such_module", "no command 'no-such-stage'",
                     "required: --output", "make target no-such-target", "make variable NO_SUCH_VARIABLE",
                     "no job 'no_such_job'", "--no-such: not a flag", "--no_such_launcher_flag: not a flag"):
        assert expected in joined, (expected, reported)


def test_placeholders_expand_to_each_alternative():
    argvs, elided = variants(shlex.split("--matcher same|elastic [--draw multinomial|systematic] "
                                         "[--resume | --overwrite] [--max-side 512 [--quality 90]] "
                                         "--master local[*] ..."))
    assert elided
    assert argvs == [["--matcher", "same", "--draw", "multinomial", "--resume", "--max-side", "512",
                      "--quality", "90", "--master", "local[*]"],
                     ["--matcher", "elastic", "--draw", "systematic", "--overwrite", "--max-side", "512",
                      "--quality", "90", "--master", "local[*]"]]
    assert variants(["SPARK_MASTER=local[*]]", "MATCHER=same|elastic"])[0] == [
        ["SPARK_MASTER=local[*]]", "MATCHER=same"], ["SPARK_MASTER=local[*]]", "MATCHER=elastic"]]
    assert variants(["[SPARK_MASTER=local[*]]", "[MATCHER=same|elastic]"])[0] == [
        ["SPARK_MASTER=local[*]", "MATCHER=same"], ["SPARK_MASTER=local[*]", "MATCHER=elastic"]]


# -- links between the pages ---------------------------------------------------------------------

def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading (markup dropped, underscores kept)."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


@pytest.mark.parametrize("doc", DOC_FILES)
def test_relative_links_lead_somewhere(doc):
    """Every relative link of a page names a file of the repository and, with
    ``#anchor``, a heading of that page (GitHub's anchors)."""
    with open(os.path.join(ROOT, doc), encoding="utf-8") as fh:
        text = re.sub(r"```.*?```", "", fh.read(), flags=re.S)
    broken = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if re.match(r"^[a-z]+:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(ROOT, doc)
        if not os.path.exists(full):
            broken.append(f"{target}: no such file")
        elif anchor and full.endswith(".md") and anchor not in _anchors(full):
            broken.append(f"{target}: no heading with that anchor")
    assert broken == []


# -- the README as a first page ------------------------------------------------------------------

#: The stages the README's flowchart shows, by their ``adaptive-transfer`` command.
FLOWCHART_STAGES = ("weights", "dedup", "resample", "shards", "pretrain", "finetune", "evaluate")


def test_readme_is_a_first_page():
    """README.md is read in minutes: at most 250 lines, a Mermaid flowchart of
    the pipeline naming every stage's command and engine, and a link to every
    page of docs/ (where the reference material lives)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    assert len(text.splitlines()) <= 250
    charts = re.findall(r"^```mermaid\n(.*?)^```", text, re.S | re.M)
    assert len(charts) == 1 and charts[0].lstrip().startswith("flowchart")
    missing = [s for s in FLOWCHART_STAGES if f"adaptive-transfer {s}" not in charts[0]]
    missing += [e for e in ("Beam", "Dataflow", "Spark", "DeepSpeed") if e not in charts[0]]
    assert missing == []
    pages = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    assert [p for p in pages if f"]({p}" not in text] == []


def _renamed_flags_table() -> dict[str, set[tuple[str, str]]]:
    """docs/stages.md's "Renamed flags": command -> {(old, new)}."""
    with open(os.path.join(ROOT, "docs", "stages.md"), encoding="utf-8") as fh:
        section = fh.read().split("## Renamed flags", 1)[1]
    rows: dict[str, set[tuple[str, str]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`--"):
            continue
        olds, news = (re.findall(r"`(--[\w-]+)`", cell) for cell in cells[1:])
        assert len(olds) == len(news), line
        for command in re.findall(r"`([\w-]+)`", cells[0]):
            rows.setdefault(command, set()).update(zip(olds, news))
    return rows


def test_renamed_flags_table_lists_every_alias():
    """Every deprecated spelling a command accepts is in the table, with the
    flag it stands for, and the table lists no other."""
    from adaptive_transfer.cli import COMMANDS
    from schemas.cli import DeprecatedAlias

    table = _renamed_flags_table()
    for name, (module, _) in COMMANDS.items():
        parser = parser_of(importlib.import_module(module).main).parser
        aliases = {(flag, action.new) for p in _all_parsers(parser)
                   for flag, action in p._option_string_actions.items() if isinstance(action, DeprecatedAlias)}
        assert aliases == table.get(name, set()), name
    assert set(table) <= set(COMMANDS)
