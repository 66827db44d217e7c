"""Content-addressed stage keys, what changed when a key misses, and one writer per key.

A stage's output folder is `<workdir>/<stage>/<key>`, where the key hashes everything that can change
its outputs (Marin's step hashing, extended to code):

    config     its config section (fields that cannot change outputs, such as worker counts, are left out)
    upstream   the keys of the stages whose outputs it reads
    inputs     a fingerprint of the input files it reads from outside the workdir (names, sizes, mtimes)
    code       the source of its stage package and of every project module it imports, transitively (read
               with `ast`, keyed by module name so the key does not depend on where the code lives), except
               modules that only report or orchestrate (REPORTING)
    libraries  the versions of the libraries that shape its outputs (torch, datatrove, tokenizers, ...)

So editing the MoE code reruns pretraining and everything after it; editing a README, a test or the MLflow
module reruns nothing. A finished stage writes these parts to `key.json`; `v3flow run --dry-run` compares
a miss against the last finished run of the stage and says which config keys, code modules, libraries,
upstream stages or inputs changed.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

KEY_FILE = "key.json"
# Project modules that cannot change a stage's outputs: reporting, servers, the CLI, orchestration (flows/).
REPORTING = ("v3flow.tracking", "v3flow.servers", "v3flow.cli", "v3flow.errors", "v3flow.cache", "flows")
PACKAGES = ("v3flow", "stages", "flows")  # the project's import packages: each is the folder of its name

Locate = Callable[[str], Path | None]  # module name -> its source file (a package: its __init__.py)


def installed(name: str) -> Path | None:
    """Where the running interpreter imports `name` from."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def in_checkout(root: Path) -> Locate:
    """Module files in a source checkout that is not installed (e.g. a scratch copy): a module's file is its
    dotted name as a path under `root`, the one rule the installed packages follow too."""

    def locate(name: str) -> Path | None:
        if name.split(".")[0] not in PACKAGES:
            return None
        path = root.joinpath(*name.split("."))
        for candidate in (path / "__init__.py", path.with_suffix(".py")):
            if candidate.is_file():
                return candidate
        return None

    return locate


def _reporting(name: str) -> bool:
    return any(name == r or name.startswith(r + ".") for r in REPORTING)


def _imports(path: Path) -> set[str]:
    """Project modules (or `module.name` candidates) imported anywhere in a file, including inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def code_files(package: str, locate: Locate = installed) -> dict[str, Path]:
    """The modules of `package` (all its files) and every project module they import, transitively."""
    init = locate(package)
    if init is None:
        raise ModuleNotFoundError(package)
    todo = {package: init}
    if init.name == "__init__.py":
        for path in init.parent.rglob("*.py"):
            if path.name == "__main__.py":  # a command-line entry point, not code that makes outputs
                continue
            rel = path.relative_to(init.parent).with_suffix("").parts
            todo[".".join([package, *[p for p in rel if p != "__init__"]])] = path
    found: dict[str, Path] = {}
    while todo:
        name, path = todo.popitem()
        if name in found or _reporting(name):
            continue
        found[name] = path
        for imported in _imports(path):
            target = locate(imported)
            if target is not None and imported not in found:
                todo[imported] = target
    return found


def files_fingerprint(root: Path, files: list[str] | None = None) -> str:
    """Names, sizes and modification times of `files` (relative to `root`; by default every file under the
    folder `root`, or the file `root` itself): what a stage's key holds of inputs that live outside the
    workdir, such as a corpus or a model to start from."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    base = root if root.is_dir() else root.parent
    if files is None:
        files = sorted(p.relative_to(base).as_posix() for p in ([root] if root.is_file() else root.rglob("*"))
                       if p.is_file())
    h = hashlib.sha256(str(root).encode())
    for rel in files:
        st = (base / rel).stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hash(path: Path) -> str:
    return file_sha256(path)[:16]


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class KeyParts:
    """Everything a stage's key hashes; saved as key.json so a later miss can be explained."""

    stage: str
    config: dict
    upstream: dict[str, str] = field(default_factory=dict)
    inputs: str = ""
    code: dict[str, str] = field(default_factory=dict)  # module -> sha256 of its source
    libraries: dict[str, str] = field(default_factory=dict)

    def key(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def save(self, out_dir: Path) -> None:
        (Path(out_dir) / KEY_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True, default=str))

    @classmethod
    def load(cls, out_dir: Path) -> KeyParts | None:
        path = Path(out_dir) / KEY_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def code_hashes(package: str, locate: Locate = installed) -> dict[str, str]:
    return {name: file_hash(path) for name, path in sorted(code_files(package, locate).items())}


def last_finished(stage_dir: Path, result_file: str) -> Path | None:
    """The most recently finished output folder of a stage (by its result file's time)."""
    done = [p.parent for p in Path(stage_dir).glob(f"*/{result_file}") if (p.parent / KEY_FILE).is_file()]
    return max(done, key=lambda p: (p / result_file).stat().st_mtime, default=None)


def explain(now: KeyParts, before: KeyParts) -> list[str]:
    """Why `now` misses where `before` ran: the config keys, code modules, libraries, upstream stages and
    inputs that differ."""
    out = []
    old, new = _flatten(before.config), _flatten(now.config)
    for k in sorted(old.keys() | new.keys()):
        if old.get(k) != new.get(k):
            out.append(f"config {k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}")
    for k in sorted(before.code.keys() | now.code.keys()):
        if before.code.get(k) != now.code.get(k):
            what = "added" if k not in before.code else "removed" if k not in now.code else "changed"
            out.append(f"code {k}: {what}")
    for k in sorted(before.libraries.keys() | now.libraries.keys()):
        if before.libraries.get(k) != now.libraries.get(k):
            out.append(f"library {k}: {before.libraries.get(k)} -> {now.libraries.get(k)}")
    for k in sorted(before.upstream.keys() | now.upstream.keys()):
        if before.upstream.get(k) != now.upstream.get(k):
            out.append(f"upstream {k}: {before.upstream.get(k)} -> {now.upstream.get(k)}")
    if before.inputs != now.inputs:
        out.append("input files changed (names, sizes or modification times)")
    return out


def _flatten(tree, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.dumps(tree)}


@contextmanager
def exclusive(out_dir: Path, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
    """One writer per stage key: a second pipeline run that reaches the same key waits here until the first
    has finished (then finds its result and reuses it). An flock on `<key>.lock` beside the folder, released
    by the OS if the holder dies."""
    lock_path = Path(out_dir).with_name(f".{Path(out_dir).name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
