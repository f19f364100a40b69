"""The book: its build hook (tools/book.py) and the built site, where no exercise is given away."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))

import book  # noqa: E402
from chapters import book_diff, diff_counts  # noqa: E402
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
    for outside in (
        page("```python", f'--8<-- "{ROTARY}:ex-rope"', "```"),
        page('!!! note "open"', "    ```python", f'    --8<-- "{ROTARY}:ex-rope"', "    ```"),
        page('???+ success "open at first"', "    ```python", f'    --8<-- "{ROTARY}:ex-rope"', "    ```"),
    ):
        with pytest.raises(book.BookError, match="outside a collapsed"):
            book.expand(outside, FIRST)


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


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                            env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr
    return site


def test_no_page_shows_a_region_marker(site):
    shown = [p.relative_to(site) for p in site.rglob("*.html") if "8<--" in p.read_text(encoding="utf-8")]
    assert not shown, f"pages show region marker comments: {shown}"


def test_no_exercise_solution_shows_outside_a_collapsed_block(site):
    assert book.visible_solutions(site) == []
    for chapter in chapters():
        html = (site / "chapters" / chapter / "index.html").read_text(encoding="utf-8")
        for name in chapter_exercises(chapter):
            assert f"exercise {name}: yours to write" in html, f"chapter {chapter} never shows exercise {name}'s stub"


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
