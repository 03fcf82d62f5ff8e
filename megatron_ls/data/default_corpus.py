"""The embedded default corpus: CPython's documentation topics (``pydoc_data.topics``).

Every CPython ships this module, so the quickstart needs no download. The text is the topics
in sorted order, each under a title line; the same interpreter version gives the same bytes.
"""

from __future__ import annotations

import os
import platform


def default_corpus_text() -> str:
    from pydoc_data.topics import topics

    parts = []
    for name in sorted(topics):
        parts.append(f"{name}\n{'=' * len(name)}\n\n{topics[name].strip()}\n\n")
    return "".join(parts)


def write_default_corpus(path: str) -> int:
    """Write the corpus as UTF-8 with '\\n' line ends; returns its size in bytes."""
    data = default_corpus_text().encode("utf-8")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def default_corpus_source() -> str:
    return f"pydoc_data.topics of CPython {platform.python_version()}"
