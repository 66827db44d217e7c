"""GSM8K-style math word problems (Cobbe et al. 2021), read from a local jsonl / parquet file, a `datasets`
folder (save_to_disk), or, for a user with hub access, a hub dataset name. v3flow ships GSM8K itself
(data/corpora/gsm8k, MIT), so nothing is downloaded by default.

A record has `question` and `answer`; the answer's last line is `#### <number>` and the lines before it are the
worked solution (the report's "original response", with `<<48/2=24>>` calculator notes removed). Responses put
their final answer in `\\boxed{}` after the reasoning; math-verify compares it with the gold number (open-r1's
and NeMo's check). Exactly one box counts: several boxes, or none, earn nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field

from v3flow.errors import DataError
from v3flow.section import Section
from v3flow.tasks.base import Problem, Split, Task

SYSTEM_PROMPT = ("Please reason step by step inside <think> and </think>, verify your reasoning, and then put "
                 "your final answer within \\boxed{}.")
_CALCULATOR = re.compile(r"<<[^>]*>>")
_BOX = "\\boxed{"


class Gsm8kSettings(Section):
    name: Literal["gsm8k"] = "gsm8k"
    train: str = Field("data/corpora/gsm8k/train.jsonl", description="Training problems: a .jsonl or .parquet "
                       "file, a `datasets` folder (save_to_disk), or hub:NAME (a hub dataset, needs access).")
    test: str = Field("data/corpora/gsm8k/test.jsonl", description="Held-out problems, in the same forms.")
    hub_config: str = Field("main", description="The hub dataset's config (hub:NAME only).")
    train_size: int | None = Field(None, gt=0, description="Use the first N training problems.")
    test_size: int | None = Field(None, gt=0, description="Use the first N held-out problems.")


def load_records(source: str, split: Split, hub_config: str = "main") -> list[dict]:
    """Rows of a jsonl / parquet file, a saved `datasets` folder, or hub:NAME."""
    import datasets

    if source.startswith("hub:"):
        return list(datasets.load_dataset(source.removeprefix("hub:"), hub_config, split=split))
    path = Path(source)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        return list(loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded)
    if not path.is_file():
        raise DataError(f"posttrain.task.{split}={source}: no such file or folder")
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise DataError(f"posttrain.task.{split}={source}: expected .jsonl, .parquet or a datasets folder")
    return list(datasets.load_dataset(kind, data_files=str(path), split="train"))


def gold_answer(answer: str) -> str:
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def worked_solution(answer: str) -> str:
    steps = _CALCULATOR.sub("", answer.rsplit("####", 1)[0]).strip()
    return f"{steps}\n\\boxed{{{gold_answer(answer)}}}"


class Gsm8k(Task):
    name = "gsm8k"
    system_prompt = SYSTEM_PROMPT

    def __init__(self, settings: Gsm8kSettings, resolve=Path):
        self.settings, self.resolve = settings, resolve
        self._cache: dict[str, list[Problem]] = {}

    def problems(self, split: Split) -> list[Problem]:
        if split not in self._cache:
            source = getattr(self.settings, split)
            if not source.startswith("hub:"):
                source = str(self.resolve(source))
            rows = load_records(source, split, self.settings.hub_config)
            limit = getattr(self.settings, f"{split}_size")
            problems = []
            for i, row in enumerate(rows[:limit]):
                if "####" not in row.get("answer", "") or not row.get("question"):
                    raise DataError(f"posttrain.task.{split}: record {i + 1} has no question, or no '#### <answer>' "
                                    "line in its answer")
                problems.append(Problem(id=f"{split}-{i}", question=row["question"], answer=gold_answer(row["answer"]),
                                        solution=worked_solution(row["answer"])))
            self._cache[split] = problems
        return self._cache[split]

    def extract(self, answer: str) -> str | None:
        """The content of the one `\\boxed{...}` (braces balanced); None for zero or several boxes."""
        if answer.count(_BOX) != 1:
            return None
        start = answer.index(_BOX) + len(_BOX)
        depth = 1
        for i in range(start, len(answer)):
            depth += {"{": 1, "}": -1}.get(answer[i], 0)
            if depth == 0:
                content = answer[start:i].strip()
                return content or None
        return None

    def original_answer(self, solution: str) -> str | None:
        """A worked solution ends in its boxed answer, as the responses do."""
        return self.extract(solution)

    def equal(self, predicted: str, gold: str) -> bool:
        from math_verify import parse, verify

        return bool(verify(parse(f"${gold}$"), parse(f"${predicted}$")))
