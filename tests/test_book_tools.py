"""Checks of the book's tools that need no browser and no network: fetch_assets.py and check_book.py."""

import base64
import hashlib
import io
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))

import check_book
import fetch_assets


def tarball(member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_assets_come_out_of_the_tarball_only_when_both_hashes_match(monkeypatch):
    packed = tarball(fetch_assets.MEMBER, b"mermaid")
    monkeypatch.setattr(fetch_assets, "TARBALL_SHA512", base64.b64encode(hashlib.sha512(packed).digest()).decode())
    monkeypatch.setattr(fetch_assets, "MEMBER_SHA256", hashlib.sha256(b"mermaid").hexdigest())
    assert fetch_assets.extract(packed) == b"mermaid"
    with pytest.raises(SystemExit, match="sha512"):
        fetch_assets.extract(tarball(fetch_assets.MEMBER, b"tampered"))


def test_an_unreachable_registry_is_a_clear_error(monkeypatch):
    def refuse(url, timeout):
        raise urllib.error.URLError("Connection refused")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(SystemExit, match="registry.npmjs.org.*Connection refused"):
        fetch_assets.download(fetch_assets.TARBALL_URL)


def test_without_chromium_the_browser_check_says_skipped(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys, "argv", ["check_book.py", "--site", str(tmp_path), "--install"])
    check_book.main()  # no apt-get on the PATH that `which` sees: nothing to install with, and no failure
    assert capsys.readouterr().out.strip().endswith(check_book.SKIPPED)


def measurements(**changes) -> dict:
    """What check_book.js reports for a page with one readable diagram and 100 short code lines."""
    diagram = {"source": "flowchart TD", "drawn": True, "error": False, "textPx": 14.0, "smallest": "a",
               "width": 600, "boxWidth": 900, "naturalWidth": 600}
    code = {"kind": "code", "title": "minisgl/x.py", "fits": 112, "lines": 100, "long": []}
    found = {"width": 1440, "diagrams": [diagram], "code": [code], "prose": [],
             "requests": ["http://127.0.0.1:8000/assets/javascripts/mermaid.min.js"]}
    return found | changes


def problems(result: dict) -> list[str]:
    return check_book.problems(result, 1, "http://127.0.0.1:8000", "1440x900")


def test_a_readable_page_has_no_problems():
    assert problems(measurements()) == []


def test_each_kind_of_problem_is_named():
    raw = {"source": "flowchart TD", "drawn": False}
    assert "was not drawn" in problems(measurements(diagrams=[raw]))[0]
    tiny = measurements()["diagrams"][0] | {"textPx": 6.3, "width": 900, "naturalWidth": 1743}
    assert "6.3 px" in problems(measurements(diagrams=[tiny]))[0]
    assert "unpkg.com" in problems(measurements(requests=["https://unpkg.com/mermaid@11/dist/mermaid.min.js"]))[0]
    prose = [{"what": "an admonition", "line": "??? hint"}]
    assert problems(measurements(prose=prose)) == ["raw markdown (an admonition): ??? hint"]
    long = [[1, "x" * 90], [2, "x" * 95], [3, "x" * 99]]
    code = {"kind": "code", "title": "x", "fits": 80, "lines": 100, "long": long}
    assert "3 of 100 code lines" in problems(measurements(code=[code]))[0]
    assert problems(measurements(code=[code | {"long": code["long"][:2]}])) == []  # 2% may scroll
