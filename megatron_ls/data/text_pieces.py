"""UTF-8 text files read as bounded pieces (lines; long lines cut after a space), for sentencepiece.

Concatenating the pieces gives the file back exactly, so encoding piece by piece is lossless and a
file without newlines (text8-like) still yields pieces sentencepiece can train on.
"""

from __future__ import annotations

from collections.abc import Iterator

from megatron_ls.errors import DataError

MAX_PIECE_CHARS = 1 << 14


def iter_text_pieces(
    path: str, chunk_chars: int = 1 << 20, max_piece: int = MAX_PIECE_CHARS
) -> Iterator[tuple[list[str], int]]:
    """Yield (pieces, their size in UTF-8 bytes) for about ``chunk_chars`` characters at a time."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            carry = ""
            while True:
                chunk = f.read(chunk_chars)
                text = carry + chunk
                if chunk:  # keep an unfinished line (or word) for the next chunk
                    cut = (text.rfind("\n") + 1) or (text.rfind(" ") + 1) or len(text)
                    text, carry = text[:cut], text[cut:]
                pieces = []
                for line in text.splitlines(keepends=True):
                    while len(line) > max_piece:
                        cut = line.rfind(" ", 0, max_piece) + 1 or max_piece
                        pieces.append(line[:cut])
                        line = line[cut:]
                    pieces.append(line)
                if pieces:
                    yield pieces, len(text.encode("utf-8"))
                if not chunk:
                    return
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason}); use --tokenizer byte for binary data") from None
