"""Our DeepSeek-V3: MLA, DeepSeekMoE with auxiliary-loss-free balancing, MTP (see MODEL.md).

    from v3flow.model.args import ModelConfig
    from v3flow.model.transformer import Transformer
"""
