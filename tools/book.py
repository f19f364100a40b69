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

Exercises. A region named ``ex-NAME`` that belongs to the page's chapter is an exercise: wherever
the walkthrough shows the code around it, its body is replaced by a ``raise NotImplementedError``
line saying that the reader writes it (the same stub the learner's workspace has), and a note after
the code block links to the exercise. The body itself is shown only where a page asks for the
region by name (``path:ex-NAME``), and the hook refuses to show it anywhere but inside a collapsed
``???`` block: the reference solution is something a learner opens on purpose.

Two more requests are generated from the snapshots at build time, so nothing is stored twice:

- ``--8<-- "diffstat:01:02"``: a table of the files chapter 02 adds, changes, moves or removes, with
  the lines added and removed;
- ``--8<-- "diff:01:02"``: the full unified diff (rename-aware, marker comments left out), for a
  ``diff`` fenced block.

A ``.md`` path is included as Markdown (a benchmark's table, say). And a link to a chapter page that
is not in this checkout (chapter 02's page, seen from the branch ``chapter-01``) becomes plain text.
"""

import posixpath
import re
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mkdocs.exceptions import PluginError  # noqa: E402

from chapters import REGION_MARKER as MARKER  # noqa: E402
from chapters import book_diff, diff_counts  # noqa: E402
from course import REPO_ROOT, chapter_exercises, chapters, snapshot_root  # noqa: E402

INCLUDE = re.compile(r"""^(?P<indent>[ \t]*)-+8<-+[ \t]+"(?P<target>[^"]+)"[ \t]*$""")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)")
PAGE_CHAPTER = re.compile(r"^chapters/(\d\d)\.md$")
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
    """Lines as the book shows them: marker comments dropped, the bodies of ``exercises`` stubbed.

    Returns the lines and the names of the exercises that were stubbed.
    """
    out, stubbed, inside = [], [], None
    for line in lines:
        marker = MARKER.match(line)
        if inside is not None:
            if marker and marker["kind"] == "end" and marker["name"] == inside:
                inside = None
            continue
        if marker:
            if marker["kind"] == "start" and marker["name"].removeprefix("ex-") in exercises:
                inside = marker["name"]
                indent = line[: len(line) - len(line.lstrip())]
                name = inside.removeprefix("ex-")
                out.append(f"{indent}raise NotImplementedError  # exercise {name}: yours to write")
                stubbed.append(name)
            continue
        out.append(line)
    return textwrap.dedent("\n".join(out)).splitlines(), stubbed


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


def in_collapsed_block(lines: list[str], at: int) -> bool:
    """Whether line ``at`` lies inside a collapsed ``??? kind "title"`` block (a <details> closed at first)."""
    depth = len(lines[at]) - len(lines[at].lstrip())
    for line in reversed(lines[:at]):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent < depth:
            if line.lstrip().startswith("??? "):
                return True
            depth = indent
            if depth == 0:
                return False
    return False


def expand(markdown: str, chapter: str | None) -> str:
    """The page with every include line replaced by what it asks for."""
    own_exercises = set(chapter_exercises(chapter)) if chapter in chapters() else set()
    lines = markdown.splitlines()
    out: list[str] = []
    pending_note: tuple[str, list[str]] | None = None  # (the fence that is open, exercises stubbed in it)
    for number, line in enumerate(lines):
        fence = FENCE.match(line)
        if pending_note and fence and line.rstrip() == pending_note[0]:
            out.append(line)
            indent = fence["indent"]
            for name in pending_note[1]:
                link = f"[exercise `{name}`](#ex-{name})"
                out += ["", f'{indent}!!! question "Exercise `{name}`"',
                        f"{indent}    The body marked `yours to write` is {link}: you write it."]
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
                if region.removeprefix("ex-") in own_exercises and not in_collapsed_block(lines, number):
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
        markdown = expand(markdown, chapter)
    except BookError as error:
        raise BookError(f"docs/{source}: {error}") from None
    return unlink_missing_chapters(markdown, Path(source).parent, files)


# ------------------------------------------------------------------------------------------------
# A check of the built site
# ------------------------------------------------------------------------------------------------


class VisibleText(HTMLParser):
    """The text of a page that shows without opening anything: everything outside <details> blocks."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "details":
            self.depth += 1

    def handle_endtag(self, tag):
        if tag == "details":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth == 0:
            self.parts.append(data)


def visible_solutions(site: Path) -> list[str]:
    """Lines of exercise solutions that a chapter page of the built ``site`` shows outside a <details>."""
    problems = []
    for chapter in chapters():
        page = site / "chapters" / chapter / "index.html"
        if not page.is_file():
            continue
        parser = VisibleText()
        parser.feed(page.read_text(encoding="utf-8"))
        visible = {line.strip() for line in "".join(parser.parts).splitlines()}
        exercises = chapter_exercises(chapter)
        # A line of a solution that the rest of the chapter's code also has gives nothing away.
        elsewhere = set()
        for path in (snapshot_root(chapter) / "minisgl").rglob("*.py"):
            shown, _ = show_code(path.read_text(encoding="utf-8").splitlines(), set(exercises))
            elsewhere.update(line.strip() for line in shown)
        for name, path in exercises.items():
            body = read_region(path.relative_to(REPO_ROOT).as_posix(), f"ex-{name}")
            # Short lines (`return out`, `else:`) say little; the others are the solution.
            telling = [line.strip() for line in body if len(line.strip()) >= 16 and line.strip() not in elsewhere]
            problems += [f"chapters/{chapter}: exercise {name} shows {line!r}" for line in telling if line in visible]
    return problems
