"""The tests of this chapter run this chapter's code."""

from pathlib import Path

import minisgl


def test_imports_the_chapters_own_package(request):
    assert Path(minisgl.__file__).resolve().parent == (request.config.minisgl_root / "minisgl").resolve()
