"""Training machinery shared by every training stage: our loop (pretraining, context extension) and TRL's
trainers (SFT, GRPO).

    loop.py         the training loop (accelerate): schedule, guards, exact resume, MTP acceptance, HF export
    recipe.py       its recipe (the config's `pretrain` section): optimizer, precision, guards, checkpoints
    schedule.py     the report's schedule and a constant one (context extension)
    spec.py         the typed run.json a stage writes for its trainer process (LoopSpec, TrlSpec)
    train.py        what a stage on our loop does: spec, launch, model artifact, result
    posttrain.py    what a TRL stage does: spec, TRL trainer process, router bias update (RouterBalance), merge
                    back into our model artifact
    posttrain_recipe.py  the router and MTP fields both TRL stages' configs share
    mtp_refit.py    the MTP module refit on packed sequences with the trunk frozen, after TRL training
    launch.py       runs a trainer process in its own process group: one process, torchrun or `accelerate
                    launch`; kills every worker when the flow run is cancelled
    checkpoint.py   full safetensors checkpoints (weights, optimizer, RNG) with exact resume
    artifact.py     the model artifact every model stage writes (model.json, checkpoint, Hugging Face folder)
    optim.py        AdamW with BF16 moments (report §3.3.4)
    precision.py    FP8 / BF16 / FP32 as the machine allows (a BF16 probe on CPUs)
    data.py         packed token sequences, addressable by position (exact resume)
    monitor.py      step metrics, tokens/s, MFU, expert loads, to metrics.jsonl and MLflow
"""

# The libraries whose versions shape a training stage's outputs (part of its cache key).
LIBRARIES = ("torch", "accelerate", "transformers", "safetensors", "numpy")
