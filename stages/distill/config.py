"""Config of the distillation stage: who teaches, how it samples, and what rejection sampling keeps.

Defaults are R1's sampling settings (temperature 0.6, top-p 0.95, R1 paper §3) and the report's two SFT forms
per problem (§5.1). Teachers:

- `openai`: any OpenAI-compatible endpoint; vLLM or SGLang serving DeepSeek-R1 is the production case;
- `hf`: a local Hugging Face model folder, sampled with transformers' generation;
- `oracle`: v3flow's programmatic teacher for the synthetic arithmetic task. It is not a model: it writes
  correct column-by-column traces with a self-check, and with probability `error_rate` makes a mistake (a
  wrong digit its check may or may not catch, a broken format, or rambling past the length limit), so that
  verification and rejection sampling have real work to do.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from v3flow.section import Section


class OpenAITeacher(Section):
    unhashed: ClassVar[frozenset[str]] = frozenset({"concurrency", "timeout_s", "retries", "api_key_env"})
    kind: Literal["openai"] = "openai"
    base_url: str = Field(description="The endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM, SGLang, transformers serve).")
    model: str = Field(description="The served model's name, e.g. deepseek-ai/DeepSeek-R1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the key (may be unset "
                             "for local servers).")
    concurrency: int = Field(8, gt=0, description="Requests in flight.")
    timeout_s: float = Field(600, gt=0, description="Per request (long reasoning traces take minutes).")
    retries: int = Field(3, ge=0, description="Retries of a failed request, with exponential backoff.")
    think_prefilled: bool = Field(False, description="The server's chat template opens <think> itself (R1-0528): "
                                  "the completion then starts inside the reasoning, and <think> is put back.")


class HFTeacher(Section):
    unhashed: ClassVar[frozenset[str]] = frozenset({"batch_size"})
    kind: Literal["hf"] = "hf"
    path: str = Field(description="A Hugging Face model folder (relative: to the project), e.g. a model this "
                      "pipeline exported. Its files are part of the stage's key.")
    batch_size: int = Field(16, gt=0, description="Prompts per generate() call.")


class OracleTeacher(Section):
    kind: Literal["oracle"] = "oracle"
    error_rate: float = Field(0.3, ge=0, le=1, description="Share of samples with a mistake.")
    self_correct: float = Field(0.5, ge=0, le=1, description="Share of digit slips the self-check catches and "
                                "fixes (R1's reflection); the rest answer wrongly.")


Teacher = Annotated[OpenAITeacher | HFTeacher | OracleTeacher, Field(discriminator="kind")]


class DistillConfig(Section):
    teacher: Teacher = Field(default_factory=OracleTeacher)
    problems: int = Field(2000, gt=0, description="Training problems sent to the teacher (the first N).")
    samples_per_problem: int = Field(2, gt=0, description="K: teacher samples per problem.")
    temperature: float = Field(0.6, ge=0, description="R1's sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="R1's top-p.")
    max_tokens: int = Field(32768, gt=0, description="Generation limit; a sample cut there is rejected as truncated.")
    max_response_tokens: int = Field(16384, gt=0, description="Length cap (student tokens) of a kept sample.")
    keep_per_problem: int = Field(1, gt=0, description="Accepted R1-form samples kept per problem (the shortest "
                                  "first: the report tuned distillation for concise answers).")
    seed: int = 0
