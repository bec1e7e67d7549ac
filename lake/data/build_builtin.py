"""Build builtin.jsonl.gz, the `builtin` corpus, from this Python's documentation (maintainers only).

The corpus ships with saelake so that `--dataset builtin` is the same text on every machine
(reading it from the running Python would change with its version and with the modules installed
next to its standard library). One JSON object per line: {"source": "pydoc" | "stdlib", "text": ...}:
Python's pydoc topics (sorted by name), then standard-library docstrings of at least 300 characters
(sorted by file; tests, idlelib and site-packages left out). Python's documentation is under the
PSF license. Rebuilding changes the corpus: update BUILTIN_SHA256 in lake/corpus.py and the README.

    python lake/data/build_builtin.py   # writes lake/data/builtin.jsonl.gz, prints its sha256
"""

import ast
import glob
import gzip
import hashlib
import json
import os
import sysconfig
from pathlib import Path


def pydoc_topics():
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def stdlib_docstrings():
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py")) + glob.glob(os.path.join(stdlib, "*", "*.py"))):
        if "test" in path or "idlelib" in path or "-packages" in path:
            continue
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 300:
                    yield doc


def main() -> None:
    lines = [json.dumps({"source": "pydoc", "text": t}) for t in pydoc_topics()]
    lines += [json.dumps({"source": "stdlib", "text": t}) for t in stdlib_docstrings()]
    raw = ("\n".join(lines) + "\n").encode()
    out = Path(__file__).with_name("builtin.jsonl.gz")
    out.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))  # mtime 0: the same bytes on a rebuild
    print(f"{out}: {len(lines)} documents, {len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()}")


if __name__ == "__main__":
    main()
