"""Normalisation and quality filters, as datatrove steps.

datatrove's Gopher/C4 filters are tuned for English web prose and would reject most source code, so the
three checks the issue asks for (length, repetition, non-text) are written here with their thresholds in
the config. Rejected documents are kept, with the reason, by the filter's exclusion writer.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from stages.data.config import FilterConfig, NormalizeConfig

_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
# DeepSeek's special tokens must never occur in raw text: the tokenizer would encode them as control tokens.
SPECIAL_TOKEN_TEXT = re.compile(r"<｜[^｜>]{1,40}｜>")


class Normalizer(PipelineStep):
    """UTF-8 text in a canonical form: Unicode normalisation, \\n line ends, no trailing blanks."""

    name = "🧹 normalise"
    type = "✂️ - FORMAT"

    def __init__(self, cfg: NormalizeConfig):
        super().__init__()
        self.cfg = cfg
        self._blank_run = re.compile(rf"\n{{{cfg.max_consecutive_blank_lines + 2},}}")

    def normalise(self, text: str) -> str:
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
        if self.cfg.unicode_form != "none":
            text = unicodedata.normalize(self.cfg.unicode_form, text)
        if self.cfg.strip_trailing_whitespace:
            text = _TRAILING_WS.sub("", text)
        text = self._blank_run.sub("\n" * (self.cfg.max_consecutive_blank_lines + 1), text)
        text = SPECIAL_TOKEN_TEXT.sub(lambda m: m.group(0).replace("｜", "|"), text)
        return text.strip("\n") + "\n"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            with self.track_time():
                before = doc.text
                doc.text = self.normalise(before)
                self.stat_update("changed" if doc.text != before else "unchanged")
            yield doc


def _is_text_char(ch: str) -> bool:
    # U+FFFD marks bytes that were not valid text somewhere upstream: count it as non-text.
    return ch != "\ufffd" and (ch.isalnum() or ch.isspace() or unicodedata.category(ch)[0] in "PS")


class QualityFilter(BaseFilter):
    """Length, repetition and non-text checks; returns (False, reason) for a rejected document."""

    name = "🔍 quality"

    def __init__(self, cfg: FilterConfig, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.cfg = cfg

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text, cfg = doc.text, self.cfg
        if len(text) < cfg.min_chars:
            return False, "too_short"
        if len(text) > cfg.max_chars:
            return False, "too_long"
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if lines:
            counts = Counter(lines)
            repeated = len(lines) - len(counts)
            if repeated / len(lines) > cfg.max_duplicate_line_fraction:
                return False, "duplicate_lines"
            line, n = counts.most_common(1)[0]
            if n > 1 and n * len(line) / len(text) > cfg.max_top_line_fraction:
                return False, "top_line_repetition"
        text_chars = sum(1 for ch in text if _is_text_char(ch))
        if text_chars / len(text) < cfg.min_text_char_fraction:
            return False, "non_text"
        return True
