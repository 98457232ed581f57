"""Docs that cannot drift: every command shown in README.md and docs/*.md is checked against the code.

Every fenced shell block (```bash, ```sh, ```shell, ```console, or an unlabelled block whose lines
look like commands) is read, line continuations joined and comments dropped; so is every inline
code span of the prose that is a command (`python -m vall_e.corpus data/x nj=16`). For each command it
names (``python -m vall_e...``, ``python scripts/x.py``, ``scripts/x.sh``, under ``torchrun``,
``deepspeed --module`` or ``scripts/run.sh``, after ``VAR=value`` prefixes, between ``|``/``&&``/``;``):

- the module or script must exist;
- every ``--flag`` must be one its argparse parser accepts (the parser is built by the entry
  point's ``build_parser()``, without running the command);
- every ``key=value`` word must be a field of :class:`vall_e.config.Config` (or ``yaml``/``help``).

Relative links (``[text](docs/x.md#anchor)``) must name a file that exists and, with an anchor, a
heading in it. A renamed flag, module, field or section then fails here instead of misleading a user.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
# first words that make a line of an unlabelled block a command (the rest is output, a table or a picture)
COMMAND_WORDS = {"python", "python3", "torchrun", "deepspeed", "bash", "sh", "pip", "source"}
SEPARATORS = {"|", "||", "&&", ";", "&"}
PLACEHOLDERS = {"...", "…"}
ENV_WORD = re.compile(r"^[A-Z_][A-Z0-9_]*=")
SCRIPT_WORD = re.compile(r"^scripts/[\w.-]+\.(py|sh)$")
CONFIG_WORD = re.compile(r"^[A-Za-z_][\w.]*=")
# Entry points without an argparse parser: they take only key=value words (the deepspeed launcher
# appends --local_rank, which training drops).
CONFIG_ONLY = {"vall_e.train": {"--local_rank", "--local-rank"}}
# Entry points whose parser is built inside main() and that this change may not edit: the parser is
# captured at its parse_args() call (main's setup before it only reads config words).
CAPTURED = {"vall_e.corpus"}


@dataclass
class Command:
    """One command of a doc: where it is, its words, and what was wrong with it."""

    where: str  # "docs/x.md:12"
    text: str
    words: list[str]
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# reading the docs


def fenced_blocks(text: str) -> Iterator[tuple[str, int, list[str]]]:
    """``(language, line number of the first content line, content lines)`` of every fenced block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        yield lang, i + 2, body
        i = j + 1


def strip_comment(line: str) -> str:
    """The line without a shell comment (a ``#`` at the start of a word, outside quotes)."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k]
    return line


def command_lines(lang: str, first: int, body: list[str]) -> Iterator[tuple[int, str]]:
    """``(line number, command text)`` of a block's commands, continuations joined."""
    prompted = any(line.lstrip().startswith("$ ") for line in body)
    pending, start = "", first
    for n, raw in enumerate(body, start=first):
        line = raw.rstrip()
        if not pending:
            start = n
            if prompted:
                if not line.lstrip().startswith("$ "):
                    continue  # output of the command above
                line = line.lstrip()[2:]
        line = strip_comment(line).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if not line:
            continue
        if lang in SHELL_LANGS or prompted or looks_like_command(line):
            yield start, line


def looks_like_command(line: str) -> bool:
    words = line.split()
    while words and ENV_WORD.match(words[0]):
        words = words[1:]
    return bool(words) and (words[0] in COMMAND_WORDS or words[0].endswith("/python")
                            or bool(SCRIPT_WORD.match(words[0])))


def inline_commands(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, command)`` of inline code spans in prose that are commands (`python -m ...`)."""
    fence = False
    for n, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", line):
            if looks_like_command(span):
                yield n, span


def split_commands(line: str) -> list[list[str]]:
    """The words of each command of a line (``a | b && c; d``), brackets and placeholders dropped."""
    try:
        words = shlex.split(line, posix=True)
    except ValueError as e:  # unbalanced quotes
        raise ValueError(f"cannot split the line as shell words ({e})") from None
    out: list[list[str]] = [[]]
    for w in words:
        if w in SEPARATORS:
            out.append([])
            continue
        end = w.endswith(";") and len(w) > 1
        w = w.rstrip(";").strip("[]")  # usage brackets: [--port 8000]
        if w and w not in PLACEHOLDERS:
            out[-1].append(w)
        if end:
            out.append([])
    return [c for c in out if c]


# --------------------------------------------------------------------------------------------
# what a command runs, and what it accepts


@dataclass
class Target:
    """The entry point a command runs: ``kind`` is "module" or "script", ``name`` its name."""

    kind: str
    name: str
    args: list[str]


def target_of(words: list[str]) -> Optional[Target | list[str]]:
    """The project entry point ``words`` run, the words of an inner command (``scripts/run.sh CMD``),
    or None when the command is not ours (pip, tensorboard, pytest ...)."""
    while words and ENV_WORD.match(words[0]):
        words = words[1:]
    if not words:
        return None
    head, rest = words[0], words[1:]
    if head in ("python", "python3") or head.endswith("/python"):
        if rest[:1] == ["-m"] and len(rest) > 1:
            return Target("module", rest[1], rest[2:]) if rest[1].split(".")[0] == "vall_e" else None
        if rest and SCRIPT_WORD.match(rest[0]):
            return Target("script", rest[0], rest[1:])
        return None
    if head in ("torchrun", "deepspeed"):
        for k, w in enumerate(rest):
            if w in ("-m", "--module") and k + 1 < len(rest):
                mod = rest[k + 1]
                return Target("module", mod, rest[k + 2:]) if mod.split(".")[0] == "vall_e" else None
            if SCRIPT_WORD.match(w):
                return Target("script", w, rest[k + 1:])
        return None
    if head in ("bash", "sh") and rest and SCRIPT_WORD.match(rest[0]):
        head, rest = rest[0], rest[1:]
    if SCRIPT_WORD.match(head):
        if head == "scripts/run.sh":
            return Target("script", head, []) if not rest else [head, *rest]
        return Target("script", head, rest)
    return None


_parsers: dict[str, "Accepts"] = {}


@dataclass
class Accepts:
    """What an entry point accepts: its option strings and how many words each one takes."""

    options: dict[str, argparse.Action]
    prog: str

    def takes_value(self, option: str) -> bool:
        return self.options[option].nargs != 0

    def many(self, option: str) -> bool:
        return self.options[option].nargs in ("+", "*", argparse.REMAINDER)


class _Captured(Exception):
    pass


def _captured_parser(main: Callable[[list[str]], object]) -> argparse.ArgumentParser:
    """The parser ``main`` builds, taken at its ``parse_args`` call (nothing after it runs)."""
    real = argparse.ArgumentParser.parse_args

    def grab(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = grab  # type: ignore[method-assign]
    try:
        main([])
    except _Captured as c:
        return c.args[0]
    finally:
        argparse.ArgumentParser.parse_args = real  # type: ignore[method-assign]
    raise AssertionError(f"{main} returned without parsing its arguments")


def _load_script(path: Path):
    name = "_docs_" + path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


def accepts(target: Target) -> Accepts | str:
    """What ``target`` accepts, or why that cannot be known (a missing module or script)."""
    key = f"{target.kind}:{target.name}"
    if key in _parsers:
        return _parsers[key]
    if target.kind == "script":
        path = REPO / target.name
        if not path.is_file():
            return f"{target.name} does not exist"
        if path.suffix != ".py":
            result: Accepts | str = Accepts({}, target.name)  # shell scripts: existence only
            _parsers[key] = result
            return result
        module = _load_script(path)
    else:
        if importlib.util.find_spec(target.name) is None:
            return f"no module {target.name}"
        main_module = target.name + ".__main__" if importlib.util.find_spec(target.name).submodule_search_locations \
            else target.name
        if importlib.util.find_spec(main_module) is None:
            return f"{target.name} is a package without __main__: python -m cannot run it"
        if target.name in CONFIG_ONLY:
            dummy = argparse.ArgumentParser(prog=f"python -m {target.name}", add_help=False)
            for opt in sorted(CONFIG_ONLY[target.name]):
                dummy.add_argument(opt, nargs="?")
            result = Accepts(dict(dummy._option_string_actions), dummy.prog)
            _parsers[key] = result
            return result
        module = importlib.import_module(main_module)
    if target.kind == "module" and target.name in CAPTURED:
        parser = _captured_parser(module.main)
    elif hasattr(module, "build_parser"):
        parser = module.build_parser()
    else:
        return f"{target.name} has no build_parser(): add one (the parser main() uses) so its flags can be checked"
    result = Accepts(dict(parser._option_string_actions), parser.prog)
    _parsers[key] = result
    return result


def config_fields() -> set[str]:
    from vall_e.config import Config

    return set(Config.field_names()) | {"yaml", "help"}


def check_words(target: Target, ok: Accepts, fields: set[str]) -> list[str]:
    """Problems with ``target.args``: flags ``ok`` does not accept, ``key=value`` words that are no field."""
    problems = []
    words, k = target.args, 0
    while k < len(words):
        w = words[k]
        k += 1
        if w == "--":
            break
        if re.match(r"^--?[A-Za-z]", w):
            option = w.split("=", 1)[0]
            if option not in ok.options:
                known = sorted(o for o in ok.options if o.startswith("--"))
                problems.append(f"{ok.prog} does not accept {option} (it accepts: {', '.join(known) or 'no flags'})")
                continue
            if "=" in w or not ok.takes_value(option):
                continue
            if ok.many(option):  # its values run to the next flag
                while k < len(words) and not words[k].startswith("-"):
                    k += 1
            elif k < len(words):
                k += 1  # the flag's value, whatever it looks like
            continue
        if CONFIG_WORD.match(w):
            key = w.split("=", 1)[0].split(".")[0]
            if key not in fields:
                problems.append(f"{key}= is not a config field (vall_e/config.py; `help=true` lists them)")
    return problems


def check_command(words: list[str], fields: set[str]) -> tuple[bool, list[str]]:
    """(whether ``words`` run one of ours, the problems found)."""
    target = target_of(words)
    if target is None:
        return False, []
    if isinstance(target, list):  # scripts/run.sh <command>
        inner_ours, inner = check_command(target[1:], fields)
        exists = [] if (REPO / target[0]).is_file() else [f"{target[0]} does not exist"]
        return True, exists + inner
    ok = accepts(target)
    if isinstance(ok, str):
        return True, [ok]
    return True, check_words(target, ok, fields)


def doc_commands(path: Path, text: Optional[str] = None) -> list[Command]:
    """Every command of ours in ``path`` (or in ``text`` as if it were that file), checked."""
    text = path.read_text(encoding="utf-8") if text is None else text
    rel = path.relative_to(REPO) if path.is_absolute() and path.is_relative_to(REPO) else path
    fields = config_fields()
    lines: list[tuple[int, str]] = []
    for lang, first, body in fenced_blocks(text):
        if not lang or lang in SHELL_LANGS:
            lines += command_lines(lang, first, body)
    lines += inline_commands(text)
    out = []
    for n, line in sorted(lines):
        try:
            commands = split_commands(line)
        except ValueError as e:
            out.append(Command(f"{rel}:{n}", line, [], [str(e)]))
            continue
        for words in commands:
            ours, problems = check_command(words, fields)
            if ours:
                out.append(Command(f"{rel}:{n}", line, words, problems))
    return out


# --------------------------------------------------------------------------------------------
# links


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    out, fence = set(), False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            out.add(slug(line.lstrip("#")))
    return out


def link_problems(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code are not links
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            problems.append(f"{path.relative_to(REPO)}: link to {target}: {file} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{path.relative_to(REPO)}: link to {target}: no heading with that anchor in {file or path.name}")
    return problems


# --------------------------------------------------------------------------------------------
# the tests


def test_every_command_in_the_docs_is_accepted() -> None:
    commands = [c for doc in DOCS for c in doc_commands(doc)]
    bad = [f"{c.where}: {c.text}\n    -> " + "\n    -> ".join(c.problems) for c in commands if c.problems]
    assert not bad, "commands in the docs that the code no longer accepts:\n" + "\n".join(bad)
    # the reader itself still finds the commands (a broken reader would pass vacuously)
    per_doc = {doc.name: sum(1 for c in commands if c.where.startswith(str(doc.relative_to(REPO)) + ":"))
               for doc in DOCS}
    assert all(per_doc.values()) and sum(per_doc.values()) >= 40, per_doc


def test_links_between_the_docs_resolve() -> None:
    problems = [p for doc in DOCS for p in link_problems(doc)]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_what_drifts() -> None:
    """A wrong flag, module, script or config word in a shell block is reported; output lines of a
    console block, other tools and usage brackets are not."""
    doc = REPO / "docs" / "example.md"
    text = "\n".join([
        "```bash",
        "python -m vall_e.emb.qnt data/x --no-such-flag device=cpu",  # 2
        "OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m vall_e.emb.qnt data/x no_such_field=1",  # 3
        "python -m vall_e.no_such_module",  # 4
        "scripts/run.sh python -m vall_e.train yaml=config/test/ar.yml --resume",  # 5
        "python scripts/no_such_script.py",  # 6
        "pip install -e . && python -m vall_e.evaluate list.tsv --out o \\",  # 7
        "    --runs 1 --rows codec,ground_truth",
        "python -m vall_e.serve --ar-ckpt a.pt --nar-ckpt n.pt [--port 8000] --voices v/",  # 9
        "```",
        "```",
        "$ python -m vall_e.train yaml=config/test/ar.yml log_every=0",  # 12
        "error: log_every=0 must be at least 1 --not-a-flag",
        "```",
        "Build ahead with `python -m vall_e.corpus data/x nj=2 --jobs 4`, or see `tensorboard --logdir logs`.",  # 15
    ])
    found = {c.where.rsplit(":", 1)[1]: c.problems for c in doc_commands(doc, text)}
    assert set(found) == {"2", "3", "4", "5", "6", "7", "9", "12", "15"}, found
    assert "does not accept --no-such-flag" in found["2"][0] and len(found["2"]) == 1
    assert found["3"] == ["no_such_field= is not a config field (vall_e/config.py; `help=true` lists them)"]
    assert found["4"] == ["no module vall_e.no_such_module"]
    assert "does not accept --resume" in found["5"][0]
    assert found["6"] == ["scripts/no_such_script.py does not exist"]
    assert found["7"] == found["9"] == found["12"] == []
    assert "does not accept --jobs" in found["15"][0]


@pytest.mark.parametrize("heading, anchor", [
    ("Prompt modes: `speaker` and `paper`", "prompt-modes-speaker-and-paper"),
    ("Monitoring: TensorBoard (and W&B)", "monitoring-tensorboard-and-wb"),
    ("Decoding safeguards' cost", "decoding-safeguards-cost"),
])
def test_anchor_slugs_follow_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor
