"""The documentation cannot go stale unnoticed: the README is a short front door whose quickstart is what CI
runs, every command has a page in docs/ whose options table is the one its parser generates and which names
every option of its --help, every shipped recipe is listed, and every relative link resolves. Fast: no
network, no training, parsers only."""
from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
from pathlib import Path

import pytest

from cnnkit.cli import build_parser, manual
from conftest import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"
COMMANDS = manual.command_names()


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((dict(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def help_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string `--help` shows for this parser and its subcommands (`math conv` ...), read from the
    parser itself rather than from manual.py, so a renderer that dropped one is caught here."""
    found = {s for a in parser._actions if a.help is not argparse.SUPPRESS for s in a.option_strings}
    for sub in subparsers_of(parser).values():
        found |= help_options(sub)
    return found


def missing_options(page: str, options: set[str]) -> list[str]:
    """The options a page never names. A whole-word match: `--report` is not found inside `--report-tta`
    or `--no-report`."""
    return sorted(o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", page))


def test_every_command_has_a_page_and_the_index_lists_it():
    assert COMMANDS == list(subparsers_of(build_parser()))  # `cnnkit --help`'s order, as cli.COMMANDS
    assert len(COMMANDS) >= 13
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for name in COMMANDS:
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing: run python scripts/docs.py"
        assert f"]({name}.md)" in index, f"docs/README.md does not link {name}.md"


@pytest.mark.parametrize("name", COMMANDS)
def test_the_generated_options_table_is_current(name):
    page = (DOCS / f"{name}.md").read_text(encoding="utf-8")
    assert manual.updated_page(page, name) == page, \
        f"docs/{name}.md's options table differs from `cnnkit {name} --help`: run python scripts/docs.py"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_of_the_help_is_in_its_page(name):
    parser = subparsers_of(build_parser())[name]
    options = help_options(parser)
    assert "--help" in options and len(options) >= 2
    page = (DOCS / f"{name}.md").read_text(encoding="utf-8")
    assert missing_options(page, options) == [], f"docs/{name}.md does not name these options of its --help"


def test_the_option_check_catches_an_option_missing_from_a_page():
    page = (DOCS / "train.md").read_text(encoding="utf-8")
    options = help_options(subparsers_of(build_parser())["train"])
    assert missing_options(page, options) == []
    assert missing_options(page.replace("--aug-blur", "--aug-blurred"), options) == ["--aug-blur"]
    # `--report` named only as part of longer options does not count
    only_longer = re.sub(r"(?<![\w-])--report(?![\w-])", "", page)
    assert missing_options(only_longer, options) == ["--report"]
    assert "--report-tta" in only_longer and "--no-report" in only_longer
    # and a stale table is caught: a row removed from the generated section
    stale = page.replace("| `--aug-blur` |", "| `--aug-blu` |", 1)
    assert stale != page and manual.updated_page(stale, "train") == page


def test_the_generated_table_reads_the_parser():
    table = manual.options_markdown("predict")
    assert table.startswith("<!-- options:") and table.endswith(manual.END)
    assert "| `--runtime` | `{auto,torch,onnx,int8,openvino,openvino-int8}` | `auto` |" in table
    assert "| `--top-k` | `TOP_K` | `3` |" in table
    train = manual.options_markdown("train")
    assert "| `--epochs` | `EPOCHS` | `10` | passes over the training split |" in train  # "(default: 10)" moved
    assert "| `--lookahead`, `--no-lookahead` |" in train
    assert r"adam \| adamw" in train  # a pipe in help text does not split the cell
    math = manual.options_markdown("math")
    assert "### `cnnkit math conv`" in math and "| `--logits` | `LOGITS [LOGITS ...]` |  | required." in math
    with pytest.raises(ValueError):
        manual.updated_page("# a page without its section\n", "train")


def test_every_recipe_is_linked_from_the_recipes_page():
    page = (DOCS / "recipes.md").read_text(encoding="utf-8")
    recipes = sorted((ROOT / "src" / "cnnkit" / "recipes").glob("*.yaml"))
    assert len(recipes) >= 9
    unlisted = [p.name for p in recipes if f"(../src/cnnkit/recipes/{p.name})" not in page]
    assert unlisted == [], "docs/recipes.md does not link these recipe files"


def test_the_readme_is_a_short_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; the limit is 160 (aim for 150): move text to docs/"
    text = "\n".join(lines)
    assert "](docs/README.md)" in text and "](docs/benchmarks.md)" in text and "](docs/architecture.md)" in text


def quickstart_commands(readme: str) -> list[str]:
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_the_readme_quickstart_test_command_is_what_ci_runs():
    commands = quickstart_commands(README.read_text(encoding="utf-8"))
    assert len(commands) == 2, commands
    assert commands[0].startswith("bash scripts/setup.sh") and "cnnkit train" in commands[0]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert commands[1] in [line for line in ci if line and not line.startswith("#")], \
        f".ci/run does not run the README's test command verbatim: {commands[1]!r}"


def without_code(text: str) -> str:
    """Markdown with fenced blocks and code spans blanked: a link shown as code is no link."""
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in without_code(path.read_text(encoding="utf-8").replace("`", "")).splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return found


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked (no network)
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_catches_a_broken_link(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md) [ok](other.md#a-code-heading) [gone](missing.md) [bad](other.md#nowhere)\n"
                    "`[not a link](missing.md)`\n```\n[nor this](missing.md)\n```\n[web](https://example.org)\n")
    assert broken_links(page) == ["missing.md", "other.md#nowhere"]


def load_docs_script():
    spec = importlib.util.spec_from_file_location("docs_script", ROOT / "scripts" / "docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_script_checks_writes_and_creates(tmp_path, capsys):
    script = load_docs_script()
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    assert script.main(["--check", "--docs", str(docs)]) == 0
    page = docs / "serve.md"
    prose = "Hand-written prose stays.\n"
    page.write_text(page.read_text(encoding="utf-8").replace("| `--port` |", "| `--porch` |") + prose)
    (docs / "audit.md").unlink()
    assert script.main(["--check", "--docs", str(docs)]) == 1
    err = capsys.readouterr().err
    assert "serve.md" in err and "audit.md (missing" in err and "explain.md" not in err
    assert script.main(["--docs", str(docs)]) == 0  # write: the table fixed, the prose kept, the page made
    assert page.read_text(encoding="utf-8").endswith(prose) and "| `--port` |" in page.read_text(encoding="utf-8")
    assert manual.has_section((docs / "audit.md").read_text(encoding="utf-8"))
    assert script.main(["--check", "--docs", str(docs)]) == 0
