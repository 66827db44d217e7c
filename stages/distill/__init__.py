"""Distillation stage (report §5.1, R1 §2.3.3): a teacher answers each training problem K times with its reasoning
in `<think>...</think>` first; rejection sampling keeps a sample only if its format is right, its answer
verifies (the task's verifier), it finished (not cut at the generation limit) and it fits the length cap
(counted in the student's tokens, role `model`). Every sample is kept with its reason.

    out_dir/generations.jsonl   the teacher's raw samples, appended as they come (a killed run resumes here)
    out_dir/samples.parquet     every sample: problem, response, finish reason, tokens, verdict, reason
    out_dir/sft.parquet         the SFT data, a `datasets` parquet with the report's two forms per problem:
                                original  <problem, the task's own solution>
                                r1        <system prompt, problem, the teacher's accepted response>
                                as TRL prompt-completion conversations (columns prompt, completion, form, ...)
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from stages.distill import teachers
from stages.distill.config import DistillConfig, HFTeacher
from v3flow.cache import files_fingerprint
from v3flow.section import Section
from v3flow.stage import StageResult, StageSpec
from v3flow.tasks import TaskConfig, build
from v3flow.tasks.arithmetic import ArithmeticSettings
from v3flow.tasks.base import CORRECT

STAGE = "distill"
ACCEPTED, TRUNCATED, TOO_LONG = "accepted", "truncated", "too_long"


class DistillStageConfig(Section):
    task: TaskConfig
    distill: DistillConfig


SPEC = StageSpec(
    STAGE, __name__, lambda cfg, wiring: DistillStageConfig(task=cfg.posttrain.task, distill=cfg.posttrain.distill),
    settings={"posttrain.task": (TaskConfig, ArithmeticSettings), "posttrain.distill": DistillConfig}, inputs={"model": "extend_phase2"},
    libraries=("transformers", "tokenizers", "datasets", "math_verify", "openai", "pyarrow"),
    headline=("acceptance_rate", "rate.wrong_answer", "rate.truncated", "problems_kept", "sft_rows"), phase="posttrain")


def fingerprint(cfg: DistillStageConfig, resolve) -> str:
    """A local teacher's files are part of the key (another model, other samples)."""
    t = cfg.distill.teacher
    return files_fingerprint(resolve(t.path)) if isinstance(t, HFTeacher) else ""


def reason(verdict, finish_reason: str, tokens: int, cap: int) -> str:
    """Why a sample is rejected (or ACCEPTED): truncation first, then format, answer, length."""
    if finish_reason == teachers.LENGTH:
        return TRUNCATED
    if verdict.reason != CORRECT:
        return verdict.reason
    return TOO_LONG if tokens > cap else ACCEPTED


def run(cfg: DistillStageConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    import datasets
    from transformers import AutoTokenizer

    d, task = cfg.distill, build(cfg.task, resolve)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"].outputs["hf"])  # the student's tokens

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    problems = task.problems("train")[: d.problems]
    requests = [teachers.Request(f"{p.id}/{k}", p, task.prompt(p, "r1"), seed=d.seed * 1_000_003 + i * 131 + k)
                for i, p in enumerate(problems) for k in range(d.samples_per_problem)]
    raw = out_dir / "generations.jsonl"
    done = _finished(raw)
    todo = [r for r in requests if r.key not in done]
    print(f"[distill] {len(problems)} problems x {d.samples_per_problem} samples from the {d.teacher.kind} teacher: "
          f"{len(done)} already generated, {len(todo)} to go", flush=True)
    if todo:
        _rewrite(raw, done)  # without a line a kill may have cut short
        generate = teachers.build(d, task, encode, tokenizer.decode, resolve)
        with raw.open("a") as f:
            for n, (request, completion) in enumerate(generate(todo), 1):
                f.write(json.dumps({"key": request.key, "text": completion.text,
                                    "finish_reason": completion.finish_reason, "tokens": completion.tokens}) + "\n")
                f.flush()
                if n % 500 == 0 or n == len(todo):
                    print(f"[distill] {n}/{len(todo)} samples", flush=True)
        done = _finished(raw)

    samples, accepted = [], {}
    for request in requests:
        text, finish = done[request.key]["text"], done[request.key]["finish_reason"]
        p, tokens = request.problem, done[request.key].get("tokens") or len(encode(text))  # the teacher's count
        verdict = task.judge(text, p.answer)
        why = reason(verdict, finish, tokens, d.max_response_tokens)
        samples.append({"key": request.key, "problem_id": p.id, "question": p.question, "gold": p.answer,
                        "response": text, "finish_reason": finish, "tokens": tokens, "format_ok": verdict.format_ok,
                        "correct": verdict.correct, "reason": why})
        if why == ACCEPTED:
            accepted.setdefault(p.id, []).append((tokens, text))

    rows = []
    for p in problems:
        kept = sorted(accepted.get(p.id, []))[: d.keep_per_problem]
        if not kept:
            continue
        rows.append(_row(task, p, "original", p.solution))
        rows.extend(_row(task, p, "r1", text) for _, text in kept)
    datasets.Dataset.from_list(samples).to_parquet(str(out_dir / "samples.parquet"))
    sft = datasets.Dataset.from_list(rows)
    sft.to_parquet(str(out_dir / "sft.parquet"))

    reasons = Counter(s["reason"] for s in samples)
    n = len(samples)
    r1_tokens = [t for p in accepted.values() for t, _ in p]
    metrics = {"samples": n, "problems": len(problems), "problems_kept": len(accepted), "sft_rows": len(rows),
               "acceptance_rate": reasons[ACCEPTED] / n,
               "accepted_mean_tokens": sum(r1_tokens) / max(len(r1_tokens), 1),
               **{f"rate.{why}": count / n for why, count in reasons.items()}}
    table = [{"reason": why, "samples": count, "share": round(count / n, 4)} for why, count in reasons.most_common()]
    (out_dir / "reasons.json").write_text(json.dumps(table, indent=2))
    result = StageResult(
        stage=STAGE, key=out_dir.name, out_dir=str(out_dir),
        outputs={"sft": str(out_dir / "sft.parquet"), "samples": str(out_dir / "samples.parquet")},
        metrics=metrics, params={"teacher": d.teacher.kind, "task": task.name},
        artifacts=[str(out_dir / "reasons.json")], tables={"rejection_reasons.json": str(out_dir / "reasons.json")},
        datasets={"distilled-sft": str(out_dir / "sft.parquet"), "teacher-samples": str(out_dir / "samples.parquet")})
    result.report_md = "\n".join([
        f"## Distillation: {task.name}, {d.teacher.kind} teacher", "",
        (f"{len(problems):,} problems x {d.samples_per_problem} samples at temperature {d.temperature:g}, top-p "
         f"{d.top_p:g}; {reasons[ACCEPTED]:,} accepted ({metrics['acceptance_rate']:.1%}); {len(accepted):,} problems "
         f"kept, {len(rows):,} SFT rows (both forms)."), "",
        "| reason | samples | share |", "|---|---|---|",
        *[f"| {r['reason']} | {r['samples']:,} | {r['share']:.1%} |" for r in table]])
    return result


def _row(task, problem, form: str, response: str) -> dict:
    return {"prompt": task.prompt(problem, form), "completion": [{"role": "assistant", "content": response}],
            "form": form, "problem_id": problem.id, "answer": problem.answer}


def _finished(path: Path) -> dict[str, dict]:
    """Samples already generated; a line cut by a kill is dropped (it is generated again)."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["key"]] = record
    return done


def _rewrite(path: Path, done: dict[str, dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    tmp.replace(path)
