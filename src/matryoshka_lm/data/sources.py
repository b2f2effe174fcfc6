"""What `matryoshka prepare` reads, streamed: text files, JSON Lines (optionally gzipped), JSON, Parquet and the
embedded default corpus. Each document comes as an iterator of its sections (corpus.sections), so a large text file
is never held whole, and encodes to the same tokens as corpus.encode_corpus gives it."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from matryoshka_lm.errors import MatryoshkaError

from .corpus import SECTION_LINES, TEXT_SUFFIXES, default_corpus, sections

FORMATS = "text (.txt .md .rst .text or no suffix), .jsonl, .jsonl.gz, .json, .parquet"
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits on
BLOCK_CHARS = 1 << 20

Document = Iterator[str]


@dataclass(frozen=True)
class Source:
    """One unit of work: a file, or the embedded default corpus (key 'default')."""

    key: str  # the path relative to the source root
    path: str
    format: str  # text | jsonl | jsonl.gz | json | parquet | default
    bytes: int
    mtime_ns: int

    def fingerprint(self) -> dict:
        return {"path": self.key, "bytes": self.bytes, "mtime_ns": self.mtime_ns}


def format_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in (".jsonl.gz", ".jsonl", ".json", ".parquet"):
        if name.endswith(suffix):
            return suffix[1:]
    return "text" if path.suffix in TEXT_SUFFIXES else None


def _file_source(f: Path, key: str) -> Source:
    fmt = format_of(f)
    if fmt is None:
        raise MatryoshkaError(f"{f}: unknown format; prepare reads {FORMATS}")
    st = f.stat()
    return Source(key, str(f), fmt, st.st_size, st.st_mtime_ns)


def find_sources(source: str | Path | None, exclude: Path | None = None) -> list[Source]:
    """The files of a source (a file, a folder searched recursively, or None/'default'), in sorted order."""
    if source is None or str(source) == "default":
        text = default_corpus()
        return [Source("default", "", "default", sum(len(d.encode()) for d in text), 0)]
    root = Path(source)
    if not root.exists():
        raise MatryoshkaError(f"source {root} does not exist")
    if root.is_file():
        return [_file_source(root, root.name)]
    skip = exclude.resolve() if exclude is not None else None
    found = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if not f.is_file() or any(part.startswith(".") for part in rel.parts):
            continue  # hidden files (.git, .DS_Store) are not corpus
        if skip is not None and f.resolve().is_relative_to(skip):
            continue  # the output folder inside the source folder
        found.append(_file_source(f, rel.as_posix()))
    if not found:
        raise MatryoshkaError(f"source folder {root} has no files")
    return found


def documents(src: Source, field: str = "text") -> Iterator[Document]:
    """Every document of `src`, each as an iterator of its sections."""
    if src.format == "default":
        return (iter(sections(d)) for d in default_corpus())
    if src.format == "text":
        return iter([_text_sections(Path(src.path))])
    if src.format in ("jsonl", "jsonl.gz"):
        return _jsonl(Path(src.path), field)
    if src.format == "json":
        return _json(Path(src.path), field)
    return _parquet(Path(src.path), field)


def _text_sections(path: Path) -> Iterator[str]:
    """The sections of a text file read in blocks: the lines of str.splitlines, SECTION_LINES at a time."""
    with open(path, encoding="utf-8") as f:  # universal newlines, as Path.read_text
        carry, lines = "", []
        while block := f.read(BLOCK_CHARS):
            lines += (carry + block).splitlines(keepends=True)
            carry = lines.pop() if lines[-1][-1] not in LINE_BREAKS else ""
            while len(lines) >= SECTION_LINES:
                yield "".join(lines[:SECTION_LINES])
                del lines[:SECTION_LINES]
        if carry:
            lines.append(carry)
        if lines:
            yield "".join(lines)


def _text_of(record, field: str, where: str) -> str | None:
    if not isinstance(record, dict) or field not in record:
        has = f" (it has {', '.join(map(str, record))})" if isinstance(record, dict) else ""
        raise MatryoshkaError(f"{where}: no {field!r} field{has}; choose the text field with --text-field")
    text = record[field]
    if text is not None and not isinstance(text, str):
        raise MatryoshkaError(f"{where}: field {field!r} is {type(text).__name__}, not text")
    return text


def _jsonl(path: Path, field: str) -> Iterator[Document]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MatryoshkaError(f"{path}:{n}: not JSON ({e.msg})") from None
                text = _text_of(record, field, f"{path}:{n}")
                if text:
                    yield iter(sections(text))
    except (gzip.BadGzipFile, EOFError) as e:
        raise MatryoshkaError(f"{path}: not a gzip file ({e})") from None


def _json(path: Path, field: str) -> Iterator[Document]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))  # a JSON document is parsed whole: use JSONL when big
    except json.JSONDecodeError as e:
        raise MatryoshkaError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records):
        text = _text_of(record, field, f"{path} [{i}]")
        if text:
            yield iter(sections(text))


def _parquet(path: Path, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MatryoshkaError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid on a file that is not Parquet
        raise MatryoshkaError(f"{path}: not a Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise MatryoshkaError(f"{path}: no {field!r} column (it has {', '.join(names)}); choose it with --text-field")
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise MatryoshkaError(f"{path}: column {field!r} holds {type(text).__name__}, not text")
            if text:
                yield iter(sections(text))


def doc_pieces(docs: Iterator[Document]) -> Iterator[tuple[str, bool]]:
    """(section, is the last of its document) for every document that is not blank (read_corpus drops those)."""
    for doc in docs:
        held: list[str] = []  # leading blank sections, then the one before the current
        blank = True
        for sec in doc:
            held.append(sec)
            blank = blank and not sec.strip()
            if not blank:
                yield from ((s, False) for s in held[:-1])
                held = held[-1:]
        if not blank:
            yield held[0], True


def checksum(src: Source) -> str:
    """sha256 of the file's bytes (of the default corpus: of its text)."""
    h = hashlib.sha256()
    if src.format == "default":
        for d in default_corpus():
            h.update(d.encode())
        return h.hexdigest()
    with open(src.path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def sample_documents(sources: list[Source], budget: int, field: str = "text") -> list[str]:
    """At most about `budget` UTF-8 bytes of text for training the tokenizer: the same share of every source
    (all of it when the sources are smaller), so the sample keeps the corpus' mix."""
    total = sum(s.bytes for s in sources)
    docs: list[str] = []
    for src in sources:
        share = None if total <= budget else max(1, budget * src.bytes // total)
        try:
            docs += _take(documents(src, field), share)
        except UnicodeDecodeError:
            continue  # not UTF-8: prepare skips the file (with a warning) too
    return docs


def _take(docs: Iterator[Document], share: int | None) -> list[str]:
    taken, n = [], 0
    for doc in docs:
        parts = []
        for sec in doc:
            size = len(sec.encode())
            if share is not None and n + size > share:
                parts.append(sec.encode()[: share - n].decode(errors="ignore"))
                n = share
                break
            parts.append(sec)
            n += size
        text = "".join(parts)
        if text.strip():
            taken.append(text)
        if share is not None and n >= share:
            break
    return taken
