"""The SFT trainer process: TRL's SFTTrainer on the input model's Hugging Face export.

    python -m stages.sft.trainer RUN_DIR        (RUN_DIR/run.json is written by the stage)

The stage's mixture (sft_mix.parquet: token ids with the mask of the tokens that carry loss: a distilled
sample's assistant turn, every token of a general-data row), samples packed best-fit into `max_length` sequences
with their own position ids, which transformers turns into a block-diagonal causal mask: packed samples never see
each other. A killed run resumes from its last checkpoint (optimizer, scheduler, RNG and data position
included).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_dir: Path) -> None:
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from stages.sft.config import SftConfig
    from v3flow.training import posttrain
    from v3flow.training.spec import TrlSpec

    spec = TrlSpec[SftConfig].read(run_dir)
    cfg = spec.recipe
    data = datasets.load_dataset("parquet", data_files=spec.data, split="train")
    data = data.select_columns(["input_ids", "assistant_masks"])  # tokenized: TRL builds the labels from the mask
    tokenizer = AutoTokenizer.from_pretrained(run_dir / posttrain.TOKENIZER_DIR)
    resume = posttrain.last_checkpoint(run_dir)
    model = posttrain.load_policy(spec.hf_in, packed=cfg.packing, resume=resume)
    accumulation = cfg.batch_sequences // (cfg.micro_batch * cfg.num_processes)
    args = SFTConfig(
        **posttrain.trainer_args(run_dir, spec, cfg.seed, cfg.save_steps, cfg.log_steps),
        learning_rate=cfg.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": cfg.lr * cfg.min_lr_ratio},
        warmup_steps=cfg.warmup_steps, num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=accumulation, weight_decay=cfg.weight_decay, adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1], max_grad_norm=cfg.grad_clip, max_length=cfg.max_length, packing=cfg.packing,
        packing_strategy="bfd", completion_only_loss=True)
    watch = ("loss", "mean_token_accuracy", "learning_rate", "grad_norm", posttrain.MAXVIO)
    balance = posttrain.RouterBalance(model, cfg.router, cfg.bias_speed)  # before the Trainer: frozen -> no grad
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[balance, posttrain.MetricsLog(run_dir, spec.stage, watch)])
    if resume:
        print(f"[{spec.stage}] resuming from {resume}", flush=True)
    out = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(run_dir / posttrain.TRAINED_DIR))
    final = {"steps": trainer.state.global_step, "train_loss": out.training_loss,
             "sequences": len(trainer.train_dataset), "samples": len(data),
             "tokens": int(sum(len(ids) for ids in trainer.train_dataset["input_ids"]))}
    (run_dir / "final.json").write_text(json.dumps(final, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
