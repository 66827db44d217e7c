from __future__ import annotations

import pytest
import torch

from flows.config import load_config
from tests.conftest import MICRO
from v3flow.model.transformer import Transformer


@pytest.fixture
def cfg():
    return load_config(MICRO).model


@pytest.fixture
def model(cfg):
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights()
    for moe in m.moe_layers():  # non-zero biases, so tests see them in action
        moe.gate.bias.normal_(0, 0.05)
    return m.eval()
