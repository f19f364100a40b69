"""The book: its build hook (tools/book.py) and the built site, where no exercise is given away."""

import html
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))

import book  # noqa: E402
from chapters import as_the_book_shows, book_diff, changed_files, chapter_package, diff_counts, renames  # noqa: E402
from course import chapter_exercises, chapters  # noqa: E402

FIRST = chapters()[0]
ROTARY = f"chapters/{FIRST}/minisgl/layers/rotary.py" if (REPO_ROOT / f"chapters/{FIRST}/minisgl").is_dir() \
    else "minisgl/layers/rotary.py"


def page(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def test_the_walkthrough_shows_an_exercise_as_a_stub_with_a_link():
    shown = book.expand(page("```python", f'--8<-- "{ROTARY}:apply-rotary"', "```", "after"), FIRST)
    assert "def apply_rotary(" in shown and "x.chunk(2" not in shown
    assert "    raise NotImplementedError  # exercise rope: yours to write\n```\n" in shown
    assert "[exercise `rope`](#ex-rope)" in shown
    assert shown.index("```\n\n!!! question") < shown.index("after")  # the note follows the code block
    assert "8<" not in shown


@pytest.mark.skipif(len(chapters()) < 2, reason="needs two chapters")
def test_a_later_chapter_shows_an_earlier_chapters_exercise_solved():
    later = chapters()[1]
    shown = book.expand(page("```python", f'--8<-- "{ROTARY}:apply-rotary"', "```"), later)
    assert "x.chunk(2" in shown and "NotImplementedError" not in shown and "8<" not in shown


def test_a_solution_shows_only_inside_a_collapsed_block():
    inside = page('??? success "Reference solution"', "    ```python", f'    --8<-- "{ROTARY}:ex-rope"', "    ```")
    shown = book.expand(inside, FIRST)
    assert "    first, second = x.chunk(2, dim=-1)\n" in shown  # dedented, then indented like the request
    assert shown.startswith(f'??? success {book.SOLUTION_CLASS} "Reference solution"\n')  # marked for the checks
    for outside in (
        page("```python", f'--8<-- "{ROTARY}:ex-rope"', "```"),
        page('!!! note "open"', "    ```python", f'    --8<-- "{ROTARY}:ex-rope"', "    ```"),
        page('???+ success "open at first"', "    ```python", f'    --8<-- "{ROTARY}:ex-rope"', "    ```"),
    ):
        with pytest.raises(book.BookError, match="outside a collapsed"):
            book.expand(outside, FIRST)


@pytest.mark.skipif("06" not in chapters(), reason="the epilogue teaches the rest of chapter 06's snapshot")
def test_the_epilogue_is_a_page_of_chapter_06(tmp_path, monkeypatch):
    assert book.PAGE_CHAPTER.match("chapters/06-epilogue.md")[1] == "06"
    store = (book.snapshot_root("06") / "minisgl" / "kernels" / "store.py").relative_to(REPO_ROOT).as_posix()
    code = page("```python", f'--8<-- "{store}:store-kernel"', "```")
    # A stub's note links to its exercise's section: on 06.md, or on the epilogue when the section is there.
    (tmp_path / "chapters").mkdir()
    (tmp_path / "chapters" / "06.md").write_text("### Exercise `store` { #ex-store }\n")
    monkeypatch.setattr(book, "DOCS", tmp_path)
    shown = book.expand(code, "06", "06-epilogue.md")
    assert "exercise store: yours to write" in shown and "[exercise `store`](06.md#ex-store)" in shown
    (tmp_path / "chapters" / "06.md").write_text("No section here.\n")
    shown = book.expand(code + "### Exercise `store` { #ex-store }\n", "06", "06-epilogue.md")
    assert "[exercise `store`](#ex-store)" in shown
    with pytest.raises(book.BookError, match="outside a collapsed"):
        book.expand(page("```python", f'--8<-- "{store}:ex-store"', "```"), "06", "06-epilogue.md")


def test_the_book_stubs_every_exercise_region_and_drops_the_markers():
    source = ["def f(x):", "    # --8<-- [start:f]", "    # --8<-- [start:ex-double]", "    y = x * 2",
              "    # --8<-- [end:ex-double]", "    return y", "    # --8<-- [end:f]"]
    shown, stubbed = as_the_book_shows([line + "\n" for line in source])
    assert shown == ["def f(x):\n", "    raise NotImplementedError  # exercise double: yours to write\n",
                     "    return y\n"] and stubbed == ["double"]
    assert as_the_book_shows(source, {"other"})[0] == ["def f(x):", "    y = x * 2", "    return y"]
    with pytest.raises(ValueError, match="no end marker"):
        as_the_book_shows(source[:4])


@pytest.mark.parametrize("old,new", list(itertools.pairwise(chapters())))
def test_the_book_diff_shows_no_exercise_body(old, new):
    # The diff is on chapter new's page, where chapter old's code may show solved (its learner wrote it).
    leaks = book.leaks(f"the diff {old}-{new}, line", book_diff(old, new), book.telling_lines(new))
    assert not leaks, "\n".join(leaks)


def test_a_missing_file_or_region_stops_the_build():
    with pytest.raises(book.BookError, match="no file"):
        book.expand(page('--8<-- "minisgl/no_such_file.py"'), FIRST)
    with pytest.raises(book.BookError, match="no region 'no-such-region'"):
        book.expand(page(f'--8<-- "{ROTARY}:no-such-region"'), FIRST)


@pytest.mark.skipif(len(chapters()) < 2, reason="needs two chapters")
def test_the_changes_table_lists_every_file_of_the_diff():
    old, new = chapters()[:2]
    rows = book.expand(page(f'--8<-- "diffstat:{old}:{new}"'), new).splitlines()
    counts = diff_counts(book_diff(old, new))
    assert len(rows) == 2 + len(counts) + 1  # header, separator, a row per file, the total
    assert rows[-1].startswith(f"| **{len(counts)} files** | | **{sum(c['added'] for c in counts)}** |")


class FakeFiles:
    def __init__(self, paths):
        self.paths = set(paths)

    def get_file_from_path(self, path):
        return path if path in self.paths else None


def test_links_to_chapter_pages_this_checkout_lacks_become_text():
    files = FakeFiles({"chapters/01.md", "setup.md"})
    text = "See [chapter 01](01.md#run-it), [chapter 02](02.md) and [its notebook](02-notebook.ipynb)."
    assert book.unlink_missing_chapters(text, Path("chapters"), files) == (
        "See [chapter 01](01.md#run-it), chapter 02 and its notebook."
    )
    assert book.unlink_missing_chapters("[03](chapters/03.md)", Path("."), files) == "03"
    assert book.unlink_missing_chapters("[setup](../setup.md)", Path("chapters"), files) == "[setup](../setup.md)"


# --- "What changed since chapter NN": the page names every file the diff changes ----------------------

# The chapter pages held to naming, in their "What changed" section, every file their diff changes, with
# the parts that section is told in (each opens with its title, bolded). Chapter 06's snapshot is also the
# epilogue's, so its page tells the chapter's own change and the clients' layer apart, each file in one.
WHAT_CHANGED_PARTS = {
    "06": ("The chapter's own change.", "The clients' layer (the epilogue)."),
}
# A page whose snapshot another page shares: that page's block of files is the same as this part's.
SHARED_SNAPSHOT_PAGES = {("06", "The clients' layer (the epilogue)."): "06-epilogue.md"}
# A chapter branch (``tools/chapters.py branches``) holds only the chapters up to its own: check those.
HERE = set(chapters())


def what_changed_section(text: str) -> str:
    """A chapter page's "What changed since chapter NN" section, up to its generated diffstat."""
    match = re.search(r"^## What changed since chapter \d\d\n(.*?)(?=^--8<--|^## )", text, re.MULTILINE | re.DOTALL)
    assert match, "the page has no section '## What changed since chapter NN'"
    return match[1]


def what_changed_parts(section: str, titles: tuple[str, ...]) -> dict[str, str]:
    """Each part of the section, by its title: from its bolded title to the next one (or the section's end)."""
    starts = []
    for title in titles:
        assert section.count(f"**{title}**") == 1, f"the section should open one part with **{title}**"
        starts.append(section.index(f"**{title}**"))
    bounds = sorted(zip(starts, titles)) + [(len(section), None)]
    return {title: section[start:end] for (start, title), (end, _) in itertools.pairwise(bounds)}


def named(text: str) -> set[str]:
    """What a text names as code: every `...` span."""
    return set(re.findall(r"`([^`\n]+)`", text))


def files_the_diff_changes(old: str, new: str) -> dict[str, tuple[str, ...]]:
    """Each file the diff from chapter ``old`` to ``new`` changes, adds, removes or moves, with the names
    that count as naming it (a moved file: its old path or its new one)."""
    before, after = chapter_package(old), chapter_package(new)
    moves = renames(before, after)
    files = {rel: (rel,) for rel in changed_files(before, after) if rel not in moves and rel not in moves.values()}
    files |= {to: (to, moved_from) for moved_from, to in moves.items()}
    return dict(sorted(files.items()))


def what_changed_problems(text: str, files: dict[str, tuple[str, ...]], titles: tuple[str, ...]) -> list[str]:
    """Each changed file the section names in no part, or in more than one."""
    parts = what_changed_parts(what_changed_section(text), titles)
    names = {title: named(part) for title, part in parts.items()}
    problems = []
    for rel, aliases in files.items():
        naming = [title for title in titles if names[title] & set(aliases)]
        if not naming:
            problems.append(f"{rel}: the diff changes it, but 'What changed' names it in no part")
        elif len(naming) > 1:
            problems.append(f"{rel}: named in more than one part of 'What changed': {', '.join(naming)}")
    return problems


def page_text(chapter: str) -> str:
    return (REPO_ROOT / "docs" / "chapters" / f"{chapter}.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("chapter", sorted(HERE & set(WHAT_CHANGED_PARTS)))
def test_what_changed_names_every_file_of_the_diff_in_one_part(chapter):
    before = chapters()[chapters().index(chapter) - 1]
    problems = what_changed_problems(page_text(chapter), files_the_diff_changes(before, chapter),
                                     WHAT_CHANGED_PARTS[chapter])
    assert not problems, f"docs/chapters/{chapter}.md:\n" + "\n".join(problems)


@pytest.mark.parametrize("chapter", sorted(HERE & set(WHAT_CHANGED_PARTS)))
def test_the_what_changed_check_catches_a_file_left_out_or_named_twice(chapter):
    before = chapters()[chapters().index(chapter) - 1]
    text, titles = page_text(chapter), WHAT_CHANGED_PARTS[chapter]
    files = files_the_diff_changes(before, chapter)
    section = what_changed_section(text)
    parts = what_changed_parts(section, titles)
    first, last = parts[titles[0]], parts[titles[-1]]
    # A file of the first part, no longer named there: the check names it.
    left_out = next(rel for rel in files if rel in named(first))
    without = text.replace(section, section.replace(first, first.replace(f"`{left_out}`", left_out)))
    assert what_changed_problems(without, files, titles) == [
        f"{left_out}: the diff changes it, but 'What changed' names it in no part"]
    # The same file named in the last part too: the check names it again.
    twice = text.replace(section, section.replace(last, last + f"\n- also `{left_out}`\n"))
    assert what_changed_problems(twice, files, titles) == [
        f"{left_out}: named in more than one part of 'What changed': {titles[0]}, {titles[-1]}"]
    # A file the section never names, and a page without the section at all.
    assert what_changed_problems(text, files | {"brand_new.py": ("brand_new.py",)}, titles) == [
        "brand_new.py: the diff changes it, but 'What changed' names it in no part"]
    with pytest.raises(AssertionError, match="no section"):
        what_changed_problems(text.replace("## What changed since chapter", "## Changes since chapter"), files, titles)


def files_block(text: str) -> set[str]:
    """The paths of a page's block of files (a code block opening with ``minisgl/``, after "The files")."""
    match = re.search(r"^The files\b.*?:\n\n```\nminisgl/\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert match, "the page has no block of files (```, minisgl/, a path per line) after 'The files...:'"
    return {line.split()[0] for line in match[1].splitlines() if line.startswith("  ") and not line.startswith("   ")}


@pytest.mark.parametrize("chapter,title", sorted(page for page in SHARED_SNAPSHOT_PAGES if page[0] in HERE))
def test_a_page_sharing_a_snapshot_lists_the_files_of_its_part(chapter, title):
    before = chapters()[chapters().index(chapter) - 1]
    files = files_the_diff_changes(before, chapter)
    part = what_changed_parts(what_changed_section(page_text(chapter)), WHAT_CHANGED_PARTS[chapter])[title]
    in_part = {rel for rel, aliases in files.items() if named(part) & set(aliases)}
    other = SHARED_SNAPSHOT_PAGES[(chapter, title)]
    listed = files_block((REPO_ROOT / "docs" / "chapters" / other).read_text(encoding="utf-8"))
    assert listed == in_part, (f"docs/chapters/{other} lists {sorted(listed - in_part)} that {chapter}.md's "
                               f"'{title}' does not name, and misses {sorted(in_part - listed)}")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if os.environ.get("MINISGL_BUILT_SITE"):  # built once from this checkout for every step (tools/run_tests.py)
        return Path(os.environ["MINISGL_BUILT_SITE"])
    site = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                            env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr
    return site


def test_no_page_shows_a_region_marker(site):
    shown = [p.relative_to(site) for p in site.rglob("*.html") if "8<--" in p.read_text(encoding="utf-8")]
    assert not shown, f"pages show region marker comments: {shown}"


def chapter_pages(site: Path, chapter: str) -> str:
    """The HTML of a chapter's pages: its own, and chapter 06's epilogue, which holds exercises of its snapshot."""
    pages = [site / "chapters" / name / "index.html" for name in (chapter, f"{chapter}-epilogue")]
    return "".join(page.read_text(encoding="utf-8") for page in pages if page.is_file())


def test_every_exercise_shows_as_a_stub_and_its_solution_in_a_marked_block(site):
    for chapter in chapters():
        html = chapter_pages(site, chapter)
        for name in chapter_exercises(chapter):
            assert f"exercise {name}: yours to write" in html, f"chapter {chapter} never shows exercise {name}'s stub"
        # The answer check skips the solution blocks by this class: each exercise's block must carry it.
        marked = html.count(f'<details class="success {book.SOLUTION_CLASS}"')
        assert marked >= len(chapter_exercises(chapter)), f"chapter {chapter}: {marked} marked solution blocks"


def test_no_answer_shows_in_the_site_the_notebooks_or_the_readmes(site):
    leaks = book.answer_leaks(site)
    assert not leaks, "exercise answers in the open (file:line):\n" + "\n".join(leaks)


def test_the_answer_check_finds_a_leaked_body(tmp_path):
    chapter = "04" if "04" in chapters() else chapters()[-1]
    name, lines = next((n, lines) for n, lines in book.telling_lines(chapter).items() if lines)
    line = lines[0]
    site, root, escaped = tmp_path / "site", tmp_path / "repo", html.escape(line)
    leaky_page = "\n".join([
        "<p>The page</p>",
        f'<details class="success {book.SOLUTION_CLASS}"><pre>{escaped}</pre></details>',  # the solution: no leak
        '<details class="tip"><summary>Hint</summary>',
        f"<pre><span>    </span>{escaped}</pre></details>",  # folded away, but no solution block: a leak
        f"<pre>+        {escaped}</pre>",  # a diff's line: a leak
    ])
    pages = {
        f"chapters/{chapter}/index.html": leaky_page,
        "index.html": f"<p>{escaped}</p>",  # a page of no chapter
        "chapters/99/index.html": f"<p>{escaped}</p>",  # a later chapter shows its earlier chapters' code solved
    }
    for rel, text in pages.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text, encoding="utf-8")
    (root / "chapters" / chapter).mkdir(parents=True)
    (root / "README.md").write_text(f"# Course\n\n    {line}\n", encoding="utf-8")
    notebook = {"cells": [
        {"cell_type": "code", "source": ["x = 1\n"],
         "outputs": [{"output_type": "stream", "name": "stdout", "text": ["a\n", f"{line}\n"]}]},
        {"cell_type": "code", "source": ["def f():\n", f"    {line}\n"], "outputs": []},
    ]}
    (root / "chapters" / chapter / "notebook.ipynb").write_text(json.dumps(notebook), encoding="utf-8")
    label = f"exercise {name} of chapter {chapter} shows {line!r}"
    found = [f"site/chapters/{chapter}/index.html:4", f"site/chapters/{chapter}/index.html:5", "site/index.html:1",
             "README.md:3", f"chapters/{chapter}/notebook.ipynb cell 0 (output):2",
             f"chapters/{chapter}/notebook.ipynb cell 1 (source):2"]
    assert sorted(book.answer_leaks(site, root)) == sorted(f"{where}: {label}" for where in found)


def test_no_list_renders_as_a_paragraph(site):
    # A list the Markdown parser did not see (indentation under a fenced block, say) stays a paragraph whose
    # lines start with "- " or "1. ": outside code blocks, no line of the HTML does.
    import re

    for path in site.rglob("*.html"):
        if "-notebook" in path.parent.name:  # nbconvert's output, where printed text may well start with "1. "
            continue
        html = re.sub(r"<pre.*?</pre>|<script.*?</script>|<style.*?</style>", "", path.read_text(encoding="utf-8"),
                      flags=re.DOTALL)
        raw = [line for line in html.splitlines() if re.match(r"\s*(- |\* |\d+\. )\S", line)]
        assert not raw, f"{path.relative_to(site)} shows Markdown list lines as text: {raw[:3]}"
