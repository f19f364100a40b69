"""Fetch the book's browser-side assets from a package registry, so the built site needs no CDN.

The book's diagrams are drawn in the reader's browser by mermaid. mkdocs-material loads mermaid from
unpkg.com unless a ``mermaid`` global already exists; shipping ``mermaid.min.js`` as an
``extra_javascript`` (see mkdocs.yml) makes that global exist, so the book works offline. The file is
not in the repository (3.5 MB of minified code): this script takes it from the npm registry's tarball of
a pinned mermaid release, checks the registry's sha512 of the tarball and our sha256 of the file, and
writes it to docs/assets/javascripts/ (git-ignored). `make setup` runs it.

Idempotent: when the file is there with the right hash, it does nothing.

    python tools/fetch_assets.py
"""

import base64
import hashlib
import io
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Material for MkDocs 9.x asks for mermaid@11; this is the newest 11.x release when it was pinned.
MERMAID_VERSION = "11.17.2"
TARBALL_URL = f"https://registry.npmjs.org/mermaid/-/mermaid-{MERMAID_VERSION}.tgz"
# The registry's `dist.integrity` of that tarball (https://registry.npmjs.org/mermaid/11.17.2).
TARBALL_SHA512 = "V6K3C8EBdEsPFZXSKMJe6ppQOENxuHARr9GvHX4hh47lAbhMRD9qf4oEK7LoaRQxULMa80/qt5gHO73aCleBBg=="
MEMBER = "package/dist/mermaid.min.js"
MEMBER_SHA256 = "581ed7d74bd9048d0e3a91363927d72ef22942d7722546b27f7cc29e35390eb8"
DESTINATION = REPO_ROOT / "docs" / "assets" / "javascripts" / "mermaid.min.js"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_current(path: Path = DESTINATION) -> bool:
    """True when the file is there and is exactly the pinned release's mermaid.min.js."""
    return path.is_file() and sha256(path.read_bytes()) == MEMBER_SHA256


def download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise SystemExit(
            f"error: could not download {url}: {reason}\n"
            "The book's diagrams need mermaid from the npm registry (https://registry.npmjs.org). Reach it "
            "(a proxy: set https_proxy), or copy mermaid.min.js of mermaid "
            f"{MERMAID_VERSION} to {DESTINATION.relative_to(REPO_ROOT)} (sha256 {MEMBER_SHA256})."
        ) from None


def extract(tarball: bytes) -> bytes:
    integrity = base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if integrity != TARBALL_SHA512:
        raise SystemExit(f"error: {TARBALL_URL} does not match its pinned sha512 (got sha512-{integrity})")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        data = archive.extractfile(MEMBER).read()
    if sha256(data) != MEMBER_SHA256:
        raise SystemExit(f"error: {MEMBER} in {TARBALL_URL} does not match its pinned sha256")
    return data


def main() -> None:
    if is_current():
        return
    print(f"fetching mermaid {MERMAID_VERSION} from {TARBALL_URL}", flush=True)
    data = extract(download(TARBALL_URL))
    DESTINATION.parent.mkdir(parents=True, exist_ok=True)
    partial = DESTINATION.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(DESTINATION)
    print(f"wrote {DESTINATION.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
