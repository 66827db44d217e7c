"""The GRPO trainer process: TRL's GRPOTrainer on the input model's Hugging Face export, rewards from the task.

    python -m stages.grpo.trainer RUN_DIR        (RUN_DIR/run.json is written by the stage)

Each step samples G completions for each of `prompts_per_step` questions, scores them with the task's rule-based
rewards, normalises the rewards within each group, and takes one clipped policy-gradient step with the KL to the
frozen reference model (the input model). The router biases follow the bias-update rule over the tokens of the
training passes, not the rollouts' (posttrain.RouterBalance), or stay frozen. A killed run resumes from its last
checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import TrainerCallback

from v3flow.training.launch import TrainingError

CLIPPED, ZERO_STD = "completions/clipped_ratio", "frac_reward_zero_std"


class Alarms(TrainerCallback):
    """Stop when completions keep hitting the length limit (their rewards vanish and nothing is learned: trl
    #5697); warn when most groups have no reward variance (no gradient)."""

    def __init__(self, stage: str, threshold: float, patience: int):
        self.stage, self.threshold, self.patience, self.run = stage, threshold, patience, 0
        self.tripped: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if CLIPPED in logs:
            self.run = self.run + 1 if logs[CLIPPED] >= self.threshold else 0
            if self.run >= self.patience:
                self.tripped = (f"{logs[CLIPPED]:.0%} of completions hit posttrain.grpo.max_completion_length for "
                                f"{self.run} logged steps in a row: rewards vanish. Raise the limit, or teach the model "
                                "to stop (SFT) first.")
                control.should_training_stop = True
        if logs.get(ZERO_STD, 0.0) >= 0.9:
            print(f"[{self.stage}] warning: {logs[ZERO_STD]:.0%} of groups have identical rewards (no learning signal) "
                  f"at step {state.global_step}", flush=True)


def main(run_dir: Path) -> None:
    import datasets
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from stages.grpo.config import GrpoStageConfig
    from v3flow.tasks import build
    from v3flow.tasks.rewards import bind
    from v3flow.training import posttrain
    from v3flow.training.spec import TrlSpec

    spec = TrlSpec[GrpoStageConfig].read(run_dir)
    cfg, stage = spec.recipe.grpo, spec.stage
    task = build(spec.recipe.task)
    prompts = datasets.load_dataset("parquet", data_files=spec.data, split="train")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / posttrain.TOKENIZER_DIR, padding_side="left")
    resume = posttrain.last_checkpoint(run_dir)
    model = posttrain.load_policy(spec.hf_in, resume=resume)  # the reference model stays hf_in's
    names = list(cfg.rewards)
    completions = cfg.prompts_per_step * cfg.num_generations
    args = GRPOConfig(
        **posttrain.trainer_args(run_dir, spec, cfg.seed, cfg.save_steps, cfg.log_steps),
        max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="constant", weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip, per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=completions // (cfg.micro_batch * cfg.num_processes),
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=cfg.top_p, beta=cfg.beta, epsilon=cfg.epsilon,
        num_iterations=cfg.num_iterations, loss_type=cfg.loss_type, scale_rewards="group",
        use_bias_correction_kl=False, importance_sampling_level="token", reward_weights=[cfg.rewards[n] for n in names],
        shuffle_dataset=True)
    alarms = Alarms(stage, cfg.truncation_alarm, cfg.alarm_steps)
    watch = ("reward", "reward_std", "rewards/accuracy_reward/mean", "completions/mean_length", CLIPPED, ZERO_STD,
             "kl", "loss", posttrain.MAXVIO)
    rewards = bind(names, task, cfg.max_completion_length, cfg.overlong_buffer)
    balance = posttrain.RouterBalance(model, cfg.router, cfg.bias_speed)  # counts only the passes that train
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=prompts, processing_class=tokenizer,
                          callbacks=[balance, posttrain.MetricsLog(run_dir, stage, watch), alarms])
    if cfg.fp32_logits:
        for policy in (trainer.model, trainer.ref_model):
            if policy is not None:
                posttrain.fp32_head(policy)
    if resume:
        print(f"[{stage}] resuming from {resume}", flush=True)
    out = trainer.train(resume_from_checkpoint=resume)
    if alarms.tripped:
        raise TrainingError(alarms.tripped)
    trainer.save_model(str(run_dir / posttrain.TRAINED_DIR))
    (run_dir / "final.json").write_text(json.dumps({"steps": trainer.state.global_step,
                                                    "train_loss": out.training_loss}, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
