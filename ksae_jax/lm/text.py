"""English text for the language-model workload, read offline: the GNU Collaborative
International Dictionary of English (Debian's `dict-gcide`: Webster's 1913 and WordNet
definitions, about 40 MB), any UTF-8 text file or folder of them, JSON Lines, or a datasets
folder (or, with network, a hub name)."""
from __future__ import annotations

import gzip
import json
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


def jsonl_documents(path: Path) -> list[str]:
    """The "text" field of every line of a JSON Lines file."""
    docs = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if line.strip():
            try:
                docs.append(str(json.loads(line)["text"]).strip())
            except (ValueError, KeyError, TypeError):
                raise TextError(f"{path} line {i + 1}: not a JSON object with a \"text\" "
                                "field") from None
    return [d for d in docs if d]


def dataset_documents(source: str) -> list[str]:
    """The "text" column of a datasets folder (save_to_disk's) or hub name (its train split)."""
    try:
        import datasets
    except ImportError:
        raise TextError(f"{source}: reading a datasets source needs `pip install datasets`") from None
    try:
        if Path(source).is_dir():
            data = datasets.load_from_disk(source)
            data = data["train"] if isinstance(data, datasets.DatasetDict) else data
        else:
            data = datasets.load_dataset(source, split="train")
        return [str(t).strip() for t in data["text"] if str(t).strip()]
    except (OSError, ValueError, KeyError, FileNotFoundError) as e:
        raise TextError(f"{source}: not a readable datasets folder or name with a \"text\" "
                        f"column (no network?): {str(e).splitlines()[0][:200]}") from None


def documents(source: str | Path) -> list[str]:
    """The documents of a text source: "gcide" (needs `apt-get install dict-gcide`), a text
    file or a folder of .txt files, a .jsonl file (its "text" fields), or a datasets folder
    (save_to_disk's) or hub name (with network). TextError when it is missing or holds no
    text."""
    path = Path(str(source)).expanduser()
    if str(source) == "gcide":
        if not GCIDE.is_file():
            raise TextError(f"{GCIDE} not found: apt-get install dict-gcide (or give a text file)")
        docs = gcide_documents(GCIDE)
    elif path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json",
                                                              "dataset_dict.json")):
        docs = dataset_documents(str(path))
    elif path.exists():
        try:
            docs = jsonl_documents(path) if path.suffix == ".jsonl" else file_documents(path)
        except OSError as e:
            raise TextError(f"{path}: not readable ({e.strerror or e})") from None
    elif str(source).startswith((".", "/", "~")) or path.suffix in (".txt", ".jsonl"):
        raise TextError(f"{path}: no such text file or folder")
    else:
        docs = dataset_documents(str(source))
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
