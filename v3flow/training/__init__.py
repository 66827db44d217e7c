"""Training machinery shared by every training stage (pretraining, context extension, and later SFT / GRPO).

    launch.py       runs a stage's training module in its own process group: one process, torchrun or
                    `accelerate launch`; kills every worker when the flow run is cancelled
    checkpoint.py   full safetensors checkpoints (weights, optimizer, RNG) with exact resume
    optim.py        AdamW with BF16 moments (report §3.3.4)
    precision.py    FP8 / BF16 / FP32 as the machine allows (a BF16 probe on CPUs)
    data.py         packed token sequences, addressable by position (exact resume)
    monitor.py      step metrics, tokens/s, MFU, expert loads, to metrics.jsonl and MLflow
"""
