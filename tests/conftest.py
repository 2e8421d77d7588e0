import sys
from pathlib import Path

import pytest
import torch

from model import ModelConfig

torch.set_num_threads(2)


def small_config(**overrides) -> ModelConfig:
    """A model with every layer kind, several chunks' worth of scan at short lengths, GQA, and top-2 of 6 experts."""
    kw = dict(vocab_size=101, hidden_size=64, hybrid_override_pattern="M*EM-E", num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16,
              n_groups=2, chunk_size=8, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
              moe_shared_expert_intermediate_size=48, intermediate_size=40, moe_impl="torch")
    kw.update(overrides)
    return ModelConfig(**kw)


@pytest.fixture
def make_config():
    return small_config


@pytest.fixture(scope="session")
def generate():
    """data/generate.py, the shipped data's generator, as a module (it lives beside the data, outside the import
    path): the tests that check the shipped rows against the rules that made them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))
    import generate
    return generate


@pytest.fixture
def one_thread():
    """Small matmuls on a shared 2-core machine: a second spinning thread per process only adds synchronisation
    (use with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
