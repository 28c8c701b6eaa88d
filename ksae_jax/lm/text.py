"""English text for the language-model workload, read offline: the GNU Collaborative
International Dictionary of English (Debian's `dict-gcide`: Webster's 1913 and WordNet
definitions, about 40 MB), or any UTF-8 text file or folder of them."""
from __future__ import annotations

import gzip
import re
from pathlib import Path

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
DEFAULT = "gcide"  # the text a source names when it names none
HELD_OUT_EVERY = 100  # document i is held out when i % 100 == 0 (1%; 10% of a short text)


class TextError(ValueError):
    """A text source that is missing, unreadable or empty."""


_PRONUNCIATION = re.compile(r" ?\\[^\\\n]*\\")
_SOURCE_TAG = re.compile(r"\[(?:1913 Webster|WordNet 1\.5|PJC|Century Dict\.|Webster 1913 Suppl\.)[^\]]*\]")
_SPACES = re.compile(r"[ \t]*\n[ \t]*|[ \t]+")


def _clean_entry(entry: str) -> str:
    text = _SOURCE_TAG.sub("", _PRONUNCIATION.sub("", entry)).replace("{", "").replace("}", "")
    paragraphs = (_SPACES.sub(" ", p).strip() for p in re.split(r"\n\s*\n", text))
    return "\n".join(p for p in paragraphs if p)


def gcide_documents(path: Path = GCIDE) -> list[str]:
    """One document per dictionary entry (headword, etymology, senses), with the markup
    (pronunciation keys, source tags, braces) removed; the licence header is skipped."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        raw = f.read()
    entries = re.split(r"\n\n(?=\S)", raw)
    docs = [_clean_entry(e) for e in entries if not e.lstrip().startswith("00-database")]
    return [d for d in docs[1:] if len(d) > 20]  # docs[0]: what remains of the header


def file_documents(path: Path) -> list[str]:
    """Paragraphs (separated by blank lines) of a UTF-8 text file, or of every .txt in a folder."""
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    docs = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        docs += [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return docs


def documents(source: str | Path) -> list[str]:
    """The documents of a text source: "gcide" (needs `apt-get install dict-gcide`), a text
    file, or a folder of .txt files. TextError when it is missing or holds no text."""
    if str(source) == "gcide":
        if not GCIDE.is_file():
            raise TextError(f"{GCIDE} not found: apt-get install dict-gcide (or give a text file)")
        docs = gcide_documents(GCIDE)
    else:
        path = Path(source)
        if not path.exists():
            raise TextError(f"{path}: no such text file or folder")
        try:
            docs = file_documents(path)
        except OSError as e:
            raise TextError(f"{path}: not readable ({e.strerror or e})") from None
    if not docs:
        raise TextError(f"{source}: holds no text")
    return docs


def split(docs: list[str]) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: every HELD_OUT_EVERY-th document is held out (every
    tenth or so of a text of fewer than 1,000 documents, at least every second)."""
    every = min(HELD_OUT_EVERY, max(2, len(docs) // 10))
    train = [d for i, d in enumerate(docs) if i % every]
    held = [d for i, d in enumerate(docs) if not i % every]
    return train, held
