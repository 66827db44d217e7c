"""datatrove readers for our sources, each of which quarantines bad records instead of dropping them.

datatrove's own readers log and skip a malformed JSON line or a record without text; a data team needs
those records counted and kept. Every reader here writes each bad record, with its file, line and the
reason, to `quarantine/<source>_<rank>.jsonl`, and counts it in the step's stats as `quarantined_<reason>`.

Reasons: malformed_json, invalid_utf8, missing_text, not_text (text field is not a string), empty, oversized.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import sysconfig
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.readers.base import BaseDiskReader, BaseReader
from datatrove.pipeline.readers.huggingface import HuggingFaceDatasetReader
from datatrove.pipeline.readers.parquet import ParquetReader

from stages.data.config import SourceConfig
from v3flow.errors import DataError
from v3flow.tasks import build as build_task

DEFAULT_GLOBS = {"stdlib": "**/*.py", "text": "**/*.txt", "jsonl": "**/*.jsonl*", "parquet": "**/*.parquet",
                 "hf_dataset": "**/*"}
STDLIB_EXCLUDE = ["site-packages/**", "**/__pycache__/**"]


class Quarantine:
    """Per-task quarantine file plus the checks every reader applies to a record's text."""

    def __init__(self, folder: str, source: str, max_chars: int):
        self.folder, self.source, self.max_chars = folder, source, max_chars
        self._file = None
        self._rank = 0

    def open(self, rank: int) -> None:
        self._rank = rank

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def put(self, step, reason: str, where: str, raw: Any) -> None:
        if self._file is None:
            self._file = get_datafolder(self.folder).open(f"{self.source}_{self._rank:05d}.jsonl", "wt")
        record = {"source": self.source, "where": where, "reason": reason}
        if isinstance(raw, bytes):
            record["raw_base64"] = base64.b64encode(raw).decode()
        else:
            record["raw"] = raw
        self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        step.stat_update(f"quarantined_{reason}")

    def check_text(self, text: Any) -> str | None:
        """The reason a text field is unusable, or None."""
        if not isinstance(text, str):
            return "not_text"
        if not text.strip():
            return "empty"
        if len(text) > self.max_chars:
            return "oversized"
        return None


class _QuarantiningMixin:
    """Turns datatrove's silent skip of text-less records into quarantine entries."""

    quarantine: Quarantine
    template: str | None = None

    def get_document_from_dict(self, data: dict, source_file: str, id_in_file: int | str):
        where = f"{source_file}:{id_in_file + 1 if isinstance(id_in_file, int) else id_in_file}"
        if self.template is not None:
            try:
                data = dict(data, **{self.text_key: self.template.format(**data)})
            except (KeyError, IndexError):
                self.quarantine.put(self, "missing_text", where, data)
                return None
        if self.text_key not in data:
            self.quarantine.put(self, "missing_text", where, data)
            return None
        reason = self.quarantine.check_text(data[self.text_key])
        if reason:
            self.quarantine.put(self, reason, where, data)
            return None
        doc = super().get_document_from_dict(data, source_file, id_in_file)
        doc.id = f"{self.quarantine.source}/{doc.id}"
        doc.metadata["source"] = self.quarantine.source
        return doc

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.quarantine.open(rank)
        try:
            yield from super().run(data, rank, world_size)
        finally:
            self.quarantine.close()


class JsonlSourceReader(_QuarantiningMixin, BaseDiskReader):
    """JSON lines, one record per line; bad lines are quarantined with their line number."""

    name = "📄 jsonl (quarantining)"

    def read_file(self, filepath: str):
        with self.data_folder.open(filepath, "rb", compression="infer") as f:
            for li, line in enumerate(f):
                if not line.strip():
                    continue
                with self.track_time():
                    where = f"{filepath}:{li + 1}"
                    try:
                        record = json.loads(line.decode("utf-8"))
                    except UnicodeDecodeError:
                        self.quarantine.put(self, "invalid_utf8", where, line)
                        continue
                    except json.JSONDecodeError as err:
                        self.quarantine.put(self, "malformed_json", where, line.decode("utf-8") + f" ({err})")
                        continue
                    if not isinstance(record, dict):
                        self.quarantine.put(self, "malformed_json", where, record)
                        continue
                    document = self.get_document_from_dict(record, filepath, li)
                if document:
                    yield document


class TextFileReader(_QuarantiningMixin, BaseDiskReader):
    """One document per file (source code, prose); the id is the path relative to the source root."""

    name = "📄 text files (quarantining)"

    def read_file(self, filepath: str):
        with self.data_folder.open(filepath, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.quarantine.put(self, "invalid_utf8", filepath, raw)
            return
        document = self.get_document_from_dict({"text": text, "id": filepath}, filepath, 0)
        if document:
            yield document


class ParquetSourceReader(_QuarantiningMixin, ParquetReader):
    name = "📄 parquet (quarantining)"


class HFDatasetSourceReader(_QuarantiningMixin, HuggingFaceDatasetReader):
    name = "📄 datasets (quarantining)"


class TaskReader(BaseReader):
    """Worked solutions of a post-training task's training split, `per_document` problems to a document, in the
    task's own words (question, then its solution: the report's "original response"). The held-out split is
    never rendered: a task draws it first and keeps it apart (v3flow/tasks). Documents go to tasks by index."""

    name = "🧮 task (worked problems)"

    def __init__(self, src: SourceConfig, root: Path):
        super().__init__(limit=src.max_documents or -1)
        self.source, self.settings, self.per_document, self.root = src.name, src.task, src.per_document, root

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        task = build_task(self.settings, self.root.joinpath)
        problems = task.problems("train")
        starts = range(0, len(problems), self.per_document)
        starts = starts if self.limit == -1 else starts[: self.limit]
        for n, start in enumerate(starts):
            if n % world_size != rank:
                continue
            batch = problems[start: start + self.per_document]
            doc = Document(text=task.document(batch),
                           id=f"{self.source}/{batch[0].id}", metadata={"source": self.source})
            self.update_doc_stats(doc)
            self.stat_update("documents")
            yield doc


# --------------------------------------------------------------------------------------------- building
def source_root(src: SourceConfig, resolve) -> Path:
    if src.kind == "task":  # the project: a task's files are named relative to it
        return resolve(".")
    return Path(sysconfig.get_paths()["stdlib"]) if src.kind == "stdlib" else resolve(src.path)


def list_source_files(src: SourceConfig, root: Path) -> list[str]:
    """Files of a folder source, relative to its root, filtered by glob / include / exclude, sorted (for a task:
    its local data files, none for a generated one)."""
    if src.kind == "task":
        name = getattr(src.task, "train", "")
        return [name] if name and not name.startswith("hub:") else []
    if root.is_file():
        return [root.name]
    if not root.is_dir():
        raise DataError(f"source '{src.name}': {root} does not exist")
    pattern = src.glob or DEFAULT_GLOBS[src.kind]
    exclude = src.exclude + (STDLIB_EXCLUDE if src.kind == "stdlib" else [])
    files = []
    for path in root.glob(pattern):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or any(fnmatch.fnmatch(rel, g) for g in exclude):
            continue
        if src.include and not any(fnmatch.fnmatch(rel, g) for g in src.include):
            continue
        files.append(rel)
    if not files:
        raise DataError(f"source '{src.name}': no files match {pattern!r} under {root} (include={src.include})")
    return sorted(files)


def make_reader(src: SourceConfig, root: Path, paths_file: Path | None, quarantine_dir: str, max_chars: int):
    """A datatrove reader for one source. Folder sources read the file list written to `paths_file`."""
    quarantine = Quarantine(quarantine_dir, src.name, max_chars)
    limit = src.max_documents or -1
    if src.kind == "task":
        return TaskReader(src, root)
    if src.kind == "hf_dataset":
        reader = HFDatasetSourceReader(
            str(root), load_from_disk=True, text_key=src.text_key, id_key=src.id_key, limit=limit
        )
    else:
        cls = {"stdlib": TextFileReader, "text": TextFileReader, "jsonl": JsonlSourceReader,
               "parquet": ParquetSourceReader}[src.kind]
        folder = root if root.is_dir() else root.parent
        kwargs = {} if cls is TextFileReader else {"text_key": src.text_key, "id_key": src.id_key}
        reader = cls(str(folder), paths_file=str(paths_file), limit=limit, **kwargs)
    reader.quarantine = quarantine
    reader.template = src.template
    return reader


def read_documents(folder: Path, pattern: str = "*.jsonl.gz"):
    """Yield the documents datatrove's JsonlWriter wrote under `folder` (for reports and tests)."""
    import gzip

    for path in sorted(folder.glob(pattern)):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield Document(**{k: v for k, v in json.loads(line).items() if k in ("text", "id", "metadata")})
