"""The book's build hook: it puts the chapters' code into the pages (introduced in chapter 01).

mkdocs runs ``on_page_markdown`` on every page before turning it into HTML (``hooks:`` in mkdocs.yml).
A page asks for code with a line of its own, inside a fenced block::

    ```python title="minisgl/layers/rotary.py"
    --8<-- "chapters/01/minisgl/layers/rotary.py:apply-rotary"
    ```

``path`` is relative to the repository root; ``path:name`` is the region of the file between the
comments ``# --8<-- [start:name]`` and ``# --8<-- [end:name]``. The hook replaces the line with the
code, indented like the line, with the marker comments taken out (they are for tools, not readers).
A missing file or region stops the build, so the book cannot drift from the code it explains.

Exercises. A region named ``ex-NAME`` that belongs to the page's chapter is an exercise (chapter 06's
pages are its own and the epilogue): wherever the walkthrough shows the code around it, its body is
replaced by a ``raise NotImplementedError`` line saying that the reader writes it (the same stub the
learner's workspace has), and a note after the code block links to the exercise's section (``{ #ex-NAME }``),
on this page or the chapter's other one. The body itself is shown only where a page asks for the region
by name (``path:ex-NAME``), and the hook refuses to show it anywhere but inside a collapsed ``???``
block: the reference solution is something a learner opens on purpose. The hook adds the class
``reference-solution`` to that block, so that a check of the built site can tell it from the rest.

Two more requests are generated from the snapshots at build time, so nothing is stored twice:

- ``--8<-- "diffstat:01:02"``: a table of the files chapter 02 adds, changes, moves or removes, with
  the lines added and removed;
- ``--8<-- "diff:01:02"``: the full unified diff (rename-aware, marker comments left out), for a
  ``diff`` fenced block. Every exercise's body, of any chapter, is stubbed on both sides: the reader
  sees that a function changed, not its answer. The table counts the lines of that diff.

A ``.md`` path is included as Markdown (a benchmark's table, say). And a link to a chapter page that
is not in this checkout (chapter 02's page, seen from the branch ``chapter-01``) becomes plain text.

Last, ``answer_leaks`` checks the built site, the notebooks and the READMEs for any exercise's answer
outside its reference solution block (tests/test_book.py runs it).
"""

import bisect
import functools
import json
import posixpath
import re
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mkdocs.exceptions import PluginError  # noqa: E402

from chapters import REGION_MARKER as MARKER  # noqa: E402
from chapters import as_the_book_shows, book_diff, diff_counts  # noqa: E402
from course import REPO_ROOT, chapter_exercises, chapters, snapshot_root  # noqa: E402

INCLUDE = re.compile(r"""^(?P<indent>[ \t]*)-+8<-+[ \t]+"(?P<target>[^"]+)"[ \t]*$""")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)")
# A chapter's pages: its own, and for chapter 06 the epilogue, which teaches the rest of its snapshot.
PAGE_CHAPTER = re.compile(r"^chapters/(\d\d)(?:-epilogue)?\.md$")
# An exercise's section heading, ``### Exercise `rope` { #ex-rope }``: what a stub's note links to.
EXERCISE_SECTION = re.compile(r"^#+ .*\{\s*#ex-(?P<name>[\w-]+)\s*\}\s*$", re.MULTILINE)
# The class the hook gives a ``???`` block that holds a reference solution, so that checks of the built
# site can tell it from the rest (it renders as <details class="success reference-solution">).
SOLUTION_CLASS = "reference-solution"
DOCS = REPO_ROOT / "docs"
CHAPTER_LINK = re.compile(r"\[(?P<text>[^\]]+)\]\((?P<target>(?:[\w./-]*/)?(?:chapters/)?"
                          r"\d\d(?:\.md|-notebook\.ipynb|-epilogue\.md))(?P<anchor>#[\w-]*)?\)")


class BookError(PluginError):
    """A page asks for something that does not exist, or would show a solution in the open."""


# ------------------------------------------------------------------------------------------------
# Regions of a source file
# ------------------------------------------------------------------------------------------------


def read_region(path: str, name: str | None) -> list[str]:
    """The lines of ``path`` (from the repository root), or of its region ``name``, marker lines included."""
    file = REPO_ROOT / path
    if not file.is_file():
        raise BookError(f"no file {path}")
    lines = file.read_text(encoding="utf-8").splitlines()
    if name is None:
        return lines
    markers = [(i, m["kind"]) for i, line in enumerate(lines) if (m := MARKER.match(line)) and m["name"] == name]
    starts = [i for i, kind in markers if kind == "start"]
    ends = [i for i, kind in markers if kind == "end"]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise BookError(f"{path} has no region {name!r} (one start and one end marker)")
    return lines[starts[0] + 1 : ends[0]]


def show_code(lines: list[str], exercises: set[str]) -> tuple[list[str], list[str]]:
    """Lines as the book shows them: marker comments dropped, the bodies of ``exercises`` stubbed, dedented.

    Returns the lines and the names of the exercises that were stubbed.
    """
    shown, stubbed = as_the_book_shows(lines, exercises)
    return textwrap.dedent("\n".join(shown)).splitlines(), stubbed


# ------------------------------------------------------------------------------------------------
# What changed between two chapters
# ------------------------------------------------------------------------------------------------


def diffstat_table(old: str, new: str) -> list[str]:
    """A Markdown table: each file chapter ``new`` adds, changes, moves or removes, and its line counts."""
    rows = ["| file | change | lines added | lines removed |", "|---|---|--:|--:|"]
    total_added = total_removed = 0
    for entry in diff_counts(book_diff(old, new)):
        shown = f"`{entry['path']}`" if entry["from"] is None else f"`{entry['from']}` → `{entry['path']}`"
        rows.append(f"| {shown} | {entry['change']} | {entry['added']} | {entry['removed']} |")
        total_added += entry["added"]
        total_removed += entry["removed"]
    rows.append(f"| **{len(rows) - 2} files** | | **{total_added}** | **{total_removed}** |")
    return rows


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------


def collapsed_block_opener(lines: list[str], at: int) -> int | None:
    """The line of the collapsed ``??? kind "title"`` block (a <details> closed at first) that line ``at``
    lies in, or None when it lies in none."""
    depth = len(lines[at]) - len(lines[at].lstrip())
    for number in range(at - 1, -1, -1):
        line = lines[number]
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent < depth:
            if line.lstrip().startswith("??? "):
                return number
            depth = indent
            if depth == 0:
                return None
    return None


def marked_as_solution(opener: str) -> str:
    """A ``??? kind "title"`` line with ``SOLUTION_CLASS`` added to its classes (after them: with no title,
    the block's first class is its title)."""
    if SOLUTION_CLASS in opener.split('"', 1)[0].split():
        return opener
    head, quote, title = opener.partition(' "')
    return f"{head} {SOLUTION_CLASS}{quote}{title}"


def exercise_pages(chapter: str) -> dict[str, str]:
    """Each exercise section of a chapter's pages (``{ #ex-NAME }``) -> the page it is on ("06-epilogue.md")."""
    found = {}
    for page in (f"{chapter}.md", f"{chapter}-epilogue.md"):
        path = DOCS / "chapters" / page
        if path.is_file():
            for match in EXERCISE_SECTION.finditer(path.read_text(encoding="utf-8")):
                found.setdefault(match["name"], page)
    return found


def stub_notes(indent: str, names: list[str], page: str, sections: dict[str, str]) -> list[str]:
    """The notes after a code block that stubs exercises: each links to its exercise's section, on this page
    or on the chapter's other page (chapter 06's epilogue), where mkdocs --strict checks the anchor."""
    notes = []
    for name in names:
        where = "" if sections.get(name, page) == page else sections[name]
        link = f"[exercise `{name}`]({where}#ex-{name})"
        notes += ["", f'{indent}!!! question "Exercise `{name}`"',
                  f"{indent}    The body marked `yours to write` is {link}: you write it."]
    return notes


def expand(markdown: str, chapter: str | None, page: str | None = None) -> str:
    """The page with every include line replaced by what it asks for.

    ``page`` is the page's file name in docs/chapters/ (by default the chapter's own, "NN.md"): a stub's
    note links to its exercise's section there, or on the chapter's other page.
    """
    own_exercises = set(chapter_exercises(chapter)) if chapter in chapters() else set()
    page = page or f"{chapter}.md"
    sections = exercise_pages(chapter) if own_exercises else {}
    sections |= {match["name"]: page for match in EXERCISE_SECTION.finditer(markdown)}  # as this page now is
    lines = markdown.splitlines()
    out: list[str] = []
    at: dict[int, int] = {}  # a line of the page -> its place in ``out``
    pending_note: tuple[str, list[str]] | None = None  # (the fence that is open, exercises stubbed in it)
    for number, line in enumerate(lines):
        at[number] = len(out)
        fence = FENCE.match(line)
        if pending_note and fence and line.rstrip() == pending_note[0]:
            out += [line, *stub_notes(fence["indent"], pending_note[1], page, sections)]
            pending_note = None
            continue
        match = INCLUDE.match(line)
        if not match:
            out.append(line)
            continue
        indent, target = match["indent"], match["target"]
        kind, _, rest = target.partition(":")
        if kind in ("diff", "diffstat"):
            old, _, new = rest.partition(":")
            produced = diffstat_table(old, new) if kind == "diffstat" else book_diff(old, new).splitlines()
        else:
            path, _, region = target.partition(":")
            source = read_region(path, region or None)
            if path.endswith(".md"):
                produced = source
            elif region.startswith("ex-"):
                opener = collapsed_block_opener(lines, number)
                if opener is not None:
                    out[at[opener]] = marked_as_solution(out[at[opener]])
                elif region.removeprefix("ex-") in own_exercises:
                    raise BookError(f"the solution of exercise {region[3:]} is shown outside a collapsed ??? block")
                produced, _ = show_code(source, set())
            else:
                produced, stubbed = show_code(source, own_exercises)
                if stubbed:
                    opening = next(f for f in reversed(out) if FENCE.match(f))
                    pending_note = (FENCE.match(opening)["indent"] + FENCE.match(opening)["fence"], stubbed)
        out += [indent + text if text else "" for text in produced]
    return "\n".join(out) + "\n"


def unlink_missing_chapters(markdown: str, page_dir: Path, files) -> str:
    """Turn links to chapter pages that this checkout does not have into their plain text."""

    def replace(match: re.Match) -> str:
        target = posixpath.normpath((page_dir / match["target"]).as_posix())  # "chapters/../setup.md" -> "setup.md"
        return match[0] if files.get_file_from_path(target) else match["text"]

    return CHAPTER_LINK.sub(replace, markdown)


def on_page_markdown(markdown, page, config, files):
    source = page.file.src_uri
    chapter = match[1] if (match := PAGE_CHAPTER.match(source)) else None
    try:
        markdown = expand(markdown, chapter, Path(source).name)
    except BookError as error:
        raise BookError(f"docs/{source}: {error}") from None
    return unlink_missing_chapters(markdown, Path(source).parent, files)


# ------------------------------------------------------------------------------------------------
# No answer anywhere: a check of the built site, the notebooks and the READMEs
# ------------------------------------------------------------------------------------------------

# A line of a solution shorter than this (`return out`, `else:`) says little; the longer ones tell.
TELLING_LENGTH = 16


@functools.cache
def code_so_far(chapter: str) -> str:
    """The code of chapters up to ``chapter``, as the book shows it with every exercise body stubbed: what a
    learner of that chapter may have read, one stripped line per line."""
    lines = []
    for earlier in chapters()[: chapters().index(chapter) + 1]:
        for path in sorted((snapshot_root(earlier) / "minisgl").rglob("*.py")):
            shown, _ = as_the_book_shows(path.read_text(encoding="utf-8").splitlines())
            lines += [line.strip() for line in shown]
    return "\n".join(lines)


def telling_lines(chapter: str) -> dict[str, list[str]]:
    """Each exercise of ``chapter`` -> the lines of its reference body that give it away: stripped, at least
    ``TELLING_LENGTH`` long, and not in the code so far outside the exercise bodies (a line that code has,
    even as part of a longer one, says nothing of the answer)."""
    found = {}
    for name, path in chapter_exercises(chapter).items():
        body = [line.strip() for line in read_region(path.relative_to(REPO_ROOT).as_posix(), f"ex-{name}")]
        found[name] = [line for line in body if len(line) >= TELLING_LENGTH
                       and line not in code_so_far(chapter) and not MARKER.match(line)]
    return found


def leaks(where: str, text: str, telling: dict[str, list[str]], line_of=None) -> list[str]:
    """``where:LINE: exercise NAME shows 'line'`` for each place ``text`` holds a telling line of a solution.

    A line is found inside longer ones too: a diff's ``+    line``, a notebook's longer statement.
    ``line_of`` turns an offset in ``text`` into the line to report (by default, the line of ``text``).
    """
    found = []
    for name, lines in telling.items():
        for line in lines:
            start = text.find(line)
            while start != -1:
                number = line_of(start) if line_of else text.count("\n", 0, start) + 1
                found.append(f"{where}:{number}: exercise {name} shows {line!r}")
                start = text.find(line, start + 1)
    return found


class PageText(HTMLParser):
    """The text of a built page, folded blocks included, but for its reference solution blocks (the <details>
    of class ``SOLUTION_CLASS``); each piece remembers the line of the HTML file it comes from."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.in_solution: list[bool] = []  # for each <details> open here: whether it is a solution block
        self.parts: list[str] = []
        self.starts: list[int] = []  # where each part starts in the text
        self.lines: list[int] = []  # the HTML line each part starts on
        self.length = 0

    def handle_starttag(self, tag, attrs):
        if tag == "details":
            classes = (dict(attrs).get("class") or "").split()
            self.in_solution.append(SOLUTION_CLASS in classes)

    def handle_endtag(self, tag):
        if tag == "details" and self.in_solution:
            self.in_solution.pop()

    def handle_data(self, data):
        if not any(self.in_solution):
            self.starts.append(self.length)
            self.lines.append(self.getpos()[0])
            self.parts.append(data)
            self.length += len(data)

    def text(self) -> str:
        return "".join(self.parts)

    def line_of(self, offset: int) -> int:
        part = bisect.bisect_right(self.starts, offset) - 1
        return self.lines[part] + self.parts[part].count("\n", 0, offset - self.starts[part])


def page_leaks(path: Path, where: str, telling: dict[str, list[str]]) -> list[str]:
    """The telling lines a built page shows anywhere but in its reference solution blocks."""
    parser = PageText()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return leaks(where, parser.text(), telling, parser.line_of)


def notebook_leaks(path: Path, where: str, telling: dict[str, list[str]]) -> list[str]:
    """The telling lines a notebook holds, in a cell's source or in its stored outputs (reported by cell)."""
    found = []
    for number, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
        found += leaks(f"{where} cell {number} (source)", "".join(cell["source"]), telling)
        for output in cell.get("outputs", []):
            texts = [output.get("text", ""), output.get("traceback", [])]
            texts += [data for mime, data in output.get("data", {}).items() if mime.startswith("text/")]
            text = "\n".join("".join(t) if isinstance(t, list) else t for t in texts)
            found += leaks(f"{where} cell {number} (output)", text, telling)
    return found


def text_leaks(path: Path, where: str, telling: dict[str, list[str]]) -> list[str]:
    """The telling lines a text file (a README) holds."""
    return leaks(where, path.read_text(encoding="utf-8"), telling)


# The chapter a document belongs to, from its path: a built page ("chapters/04/index.html",
# "chapters/04-notebook/index.html", "chapters/06-epilogue/index.html"), a notebook or a README.
DOCUMENT_CHAPTER = re.compile(r"^chapters/(\d\d)[-/]")


def documents(site: Path, root: Path = REPO_ROOT) -> list[tuple[Path, str, str | None]]:
    """(path, where to report it, its chapter or None) of every document a learner reads: the built
    ``site``'s pages, and in the repository ``root`` the notebooks and the READMEs.

    The site's pages are its HTML and the notebooks it offers for download. Its search index is left out:
    it holds the text of every page, the solution blocks' too.
    """
    pages = sorted(site.rglob("*.html")) + sorted(site.rglob("*.ipynb"))
    found = [(path, f"site/{path.relative_to(site).as_posix()}") for path in pages]
    readmes = [root / "README.md", root / "chapters" / "README.md", *sorted(root.glob("chapters/*/README.md"))]
    found += [(path, path.relative_to(root).as_posix()) for path in readmes if path.is_file()]
    found += [(path, path.relative_to(root).as_posix()) for path in sorted(root.glob("chapters/*/notebook.ipynb"))]
    return [(path, where, (m[1] if (m := DOCUMENT_CHAPTER.match(where.removeprefix("site/"))) else None))
            for path, where in found]


def answer_leaks(site: Path, root: Path = REPO_ROOT) -> list[str]:
    """Every place where the built ``site``, a notebook or a README shows a telling line of an exercise's
    reference body, anywhere but in the exercise's reference solution block.

    A document of a later chapter may show it: that chapter's code has the exercise solved, as its learner
    has. So each chapter's answers are looked for in the documents of that chapter and of the chapters before
    it, and in those of no chapter (the home page, the setup, the course map).
    """
    telling = {chapter: {f"{name} of chapter {chapter}": lines for name, lines in telling_lines(chapter).items()}
               for chapter in chapters()}
    found = []
    for path, where, chapter in documents(site, root):
        wanted = {label: lines for number, exercises in telling.items() if chapter is None or number >= chapter
                  for label, lines in exercises.items()}
        check = notebook_leaks if path.suffix == ".ipynb" else page_leaks if path.suffix == ".html" else text_leaks
        found += check(path, where, wanted)
    return found
