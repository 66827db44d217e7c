"""Base of every config section, and the stable content hash the flows use as cache keys and lineage."""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Names of fields that do not change a stage's outputs and so stay out of its content hash.
    unhashed: ClassVar[frozenset[str]] = frozenset()

    def hashable(self) -> dict[str, Any]:
        out = {}
        for name in type(self).model_fields:
            if name in self.unhashed:
                continue
            out[name] = _jsonable(getattr(self, name))
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Section):
        return value.hashable()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def section_hash(section: Section, *extra: str) -> str:
    """Stable 16-hex-digit content hash of a config section (plus optional upstream hashes)."""
    payload = json.dumps({"section": section.hashable(), "extra": list(extra)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
