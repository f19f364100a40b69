"""``python -m minisgl`` launches the server; bad options and bad model folders fail clearly."""

import subprocess
import sys


def run(request, *args):
    return subprocess.run(
        [sys.executable, "-m", "minisgl", *args],
        cwd=request.config.minisgl_root, capture_output=True, text=True, timeout=120,
    )


def test_help_lists_the_server_options(request):
    result = run(request, "--help")
    assert result.returncode == 0
    for option in ("--model-path", "--port", "--max-running-requests", "--context-length", "--max-prefill-length",
                   "--max-request-bytes"):
        assert option in result.stdout


def test_a_bad_model_folder_is_reported(request, tmp_path):
    result = run(request, "--model-path", str(tmp_path), "--port", "0")
    assert result.returncode == 2 and "no config.json" in result.stderr


def test_a_non_positive_limit_is_refused(request):
    result = run(request, "--max-running-requests", "0")
    assert result.returncode == 2 and "must be positive" in result.stderr
