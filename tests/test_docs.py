"""README and docs/ stay true: every relative link resolves (anchors too), every `prunefuse`
flag they show exists in the CLI, and the README stays short enough to read in five minutes."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SPAN = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
VERB = re.compile(r"\bprunefuse\s+(search|report|export|apply)\b")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", page.read_text(), re.M)}


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(target)
    return bad


def cli_flags() -> dict[str, set[str]]:
    """verb -> the option strings its parser accepts; "benchmarks" -> the benchmark scripts' options."""
    from search.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "verb")
    flags = {verb: {o for action in p._actions for o in action.option_strings} for verb, p in sub.choices.items()}
    flags["benchmarks"] = {flag for script in (ROOT / "benchmarks").glob("*.py")
                           for flag in re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", script.read_text())}
    return flags


def shown_flags(text: str) -> list[tuple[str, str | None]]:
    """(flag, verb) for every flag in a code span or block line that runs `prunefuse VERB`,
    and (flag, None) for a code span that is a flag alone (a flags table's first cell)."""
    out = []
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    snippets = [line for block in blocks for line in block.splitlines()]
    snippets += SPAN.findall(re.sub(r"```.*?```", "", text, flags=re.S))
    for snippet in snippets:
        verb = VERB.search(snippet)
        if verb:
            out += [(flag, verb.group(1)) for flag in FLAG.findall(snippet[verb.end():].split("#")[0])]
        elif snippet.startswith("--"):
            out += [(flag, None) for flag in FLAG.findall(snippet)]
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert not broken_links(page), f"{page.name}: broken links {broken_links(page)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_prunefuse_flag_shown_exists(page):
    flags = cli_flags()
    every = set().union(*flags.values())
    unknown = sorted({f"{verb or 'any'}: {flag}" for flag, verb in shown_flags(page.read_text())
                      if flag not in (flags[verb] if verb else every)})
    assert not unknown, f"{page.name} shows flags the CLI does not have: {unknown}"


def test_the_readme_is_short_and_leads_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert [line.split()[0] for line in first_block] == ["./prunefuse", "./scripts/test.sh"]


def test_the_checks_catch_a_broken_link_and_an_unknown_flag(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [gone](missing.md) [bad anchor](#nope)\n"
                    "`prunefuse search --trials 3 --no-such-flag` and `--tirals`\n")
    assert broken_links(page) == ["missing.md", "#nope"]
    flags = cli_flags()
    shown = shown_flags(page.read_text())
    assert ("--no-such-flag", "search") in shown and ("--tirals", None) in shown
    assert "--trials" in flags["search"] and "--no-such-flag" not in flags["search"]
