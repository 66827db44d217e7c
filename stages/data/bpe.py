"""Byte-level BPE tokenizer in the style of DeepSeek-V3 (report §4.1), trained with HF `tokenizers`.

- Byte-level: every string is representable, no unknown token.
- The pre-tokenizer splits digits into groups of at most three and lets a run of punctuation absorb the
  line breaks that follow it, the merge the report introduces for code and multi-line prompts. (The
  report's random splitting of such merged tokens during training is a pretraining-time option.)
- Special tokens use DeepSeek's own strings, and the chat template DeepSeek's conversation format, so the
  exported tokenizer drops into DeepSeek tooling (and chat endpoints such as `transformers serve`).

Saved as `tokenizer.json` plus `tokenizer_config.json` / `special_tokens_map.json` (transformers'
PreTrainedTokenizerFast), which `AutoTokenizer.from_pretrained(folder)` loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from v3flow.cache import file_sha256

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_END = "<｜fim▁end｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, FIM_HOLE, FIM_BEGIN, FIM_END, USER, ASSISTANT]
# Reasoning markers of R1-style data: ordinary (non-special) added tokens, as in DeepSeek-R1's tokenizer.
ADDED_TOKENS = ["<think>", "</think>"]
# DeepSeek-V3's conversation format without its tool-call parts: system prompts right after BOS, then
# <｜User｜> and <｜Assistant｜> turns, each assistant turn closed by EOS. The `generation` markers tell
# transformers which tokens the assistant wrote (TRL's assistant-only loss).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{% generation %}{{ m['content'] }}<｜end▁of▁sentence｜>"
    "{% endgeneration %}{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)

def pretokenize(digits_per_token: int = 3) -> str:
    """The pre-tokenizer's pattern; numbers split into groups of at most `digits_per_token` digits."""
    return PRETOKENIZE.replace("{1,3}", f"{{1,{digits_per_token}}}")


PRETOKENIZE = (
    r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"  # a word with at most one leading space or symbol
    r"|\p{N}{1,3}"  # digits in groups of at most three (DeepSeek-V3's); `digits_per_token` narrows it
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"  # a punctuation run, merged with the line breaks after it
    r"|\s*[\r\n]+"  # line breaks (with the indentation before them)
    r"|\s+(?!\S)|\s+"  # other whitespace; the last space joins the next word
)


def build_tokenizer(digits_per_token: int = 3) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pretokenize(digits_per_token)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, max_chars: int,
              digits_per_token: int = 3) -> Tokenizer:
    """Train on at most `max_chars` characters of `texts`; special tokens take ids 0..7 (BOS=0, EOS=1)."""
    tok = build_tokenizer(digits_per_token)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ADDED_TOKENS),
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_capped(texts, max_chars), trainer=trainer)
    tok.add_tokens(ADDED_TOKENS)
    return tok


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        if seen >= max_chars:
            return
        yield text[: max_chars - seen]
        seen += len(text)


def save_tokenizer(tok: Tokenizer, folder: Path) -> str:
    """Write the standard HF tokenizer files; returns the sha256 of tokenizer.json. (A model's folder sets
    model_max_length to its own context length: v3flow/model/hf_format.py.)"""
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[FIM_HOLE, FIM_BEGIN, FIM_END, USER, ASSISTANT],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return file_sha256(folder / "tokenizer.json")


def special_ids(tok: Tokenizer) -> dict[str, int]:
    names = {"bos": BOS, "eos": EOS, "pad": PAD, "fim_hole": FIM_HOLE, "fim_begin": FIM_BEGIN, "fim_end": FIM_END}
    return {key: tok.token_to_id(text) for key, text in names.items()}
