"""A learner on CUDA: one step under ZeRO 0 and 2, and what it publishes is its parameters, bit for bit.

Skipped where no GPU is found. Publishing copies each GPU tensor straight into the flat host buffer (no
host tensor per parameter in between), except what would otherwise all be held on the GPU at once.
"""

import math

import pytest

from learners.distributed import full_parameters, master_parameters
from learners.learner import LearnerRank
from tests.learners.conftest import make_rollouts
from warp_rlhf.config import LearnersConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("stage", [0, 2])
def test_cuda_step_then_published_weights_are_the_parameters(tiny_model_dir, stage: int) -> None:
    import torch

    cfg = LearnersConfig(zero_stage=stage, num_gpus=1, lr=1e-3, warmup_steps=0, micro_batch_size=8)
    assert not cfg.shares_prompts  # auto: off on a GPU
    learner = LearnerRank(tiny_model_dir, cfg, beta=0.1, mu=0.01, dtype="bfloat16")
    try:
        metrics = learner.step(make_rollouts())
        assert not metrics["skipped"] and math.isfinite(metrics["loss"])
        assert learner.device.type == "cuda"
        published = learner.weights().state_dict()
        for name, param in full_parameters(learner.engine.module):
            if name in published:
                assert torch.equal(published[name], param.cpu()), name
        masters = learner.weights(master=True).state_dict()
        for name, master in master_parameters(learner.engine.module, learner.engine.optimizer):
            if name in masters:
                assert masters[name].dtype == torch.float32 and torch.equal(masters[name], master.cpu()), name
    finally:
        learner.shutdown()
