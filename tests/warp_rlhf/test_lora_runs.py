"""LoRA WARP through the CLI with real Ray, vLLM and DeepSpeed: M = 2 runs on one shared engine, stopped hard
(Ctrl-C twice) and resumed, adapter-only sync, merged full checkpoints, saved adapters, and `warp-rlhf serve`
of a run's adapter."""

from __future__ import annotations

import json
import signal
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from actors import shm
from tests.processes import left_over
from tests.warp_rlhf.conftest import Train, checkpointed_step
from tests.warp_rlhf.test_serve import _greedy_reference, served
from warp_rlhf.outputs import RunDir

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
RANK = 4


STEPS = (10, 2)  # iteration 1 long enough to be stopped part-way through
BASE = {1: 0, 2: STEPS[0] + 1}  # the weights version of θ_init of iteration i


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained in two goes: Ctrl-C twice part-way through iteration 1 (the hard stop: `train` kills its Ray
    instance at once, so the last step checkpoint is the state), then `--resume` to the end. Every test below
    then also checks that a resumed LoRA run re-syncs the shared engine's base and each run's adapter."""
    out = tmp_path_factory.mktemp("lora") / "run"
    args = ["train", "--config", "configs/smoke.yaml", f"output.dir={out}", f"learners.lora.rank={RANK}",
            "learners.lora.alpha=8", "learners.lr=1e-2", "actors.share_engines=true",
            f"warp.steps=[{STEPS[0]},{STEPS[1]}]",
            # Two ranks, ZeRO-2, bf16: the adapter's fp32 masters are partitioned over the ranks, and fetching
            # them is a collective (it used to hang at the end of every run, rank 0 alone in an all-reduce).
            "learners.ranks=2", "learners.zero_stage=2", "model.dtype=bfloat16"]  # fmt: skip
    started: list[Train] = []
    try:
        started.append(first := Train(args))
        first.wait_for(out, {1: 2})
        first.process.send_signal(signal.SIGINT)  # the runs start stopping at their next step boundary...
        time.sleep(0.5)
        first.process.send_signal(signal.SIGINT)  # ...and the second Ctrl-C quits at once
        stopped = first.finish(timeout=30)  # a hang fails with the tail of train's stderr
        assert stopped.returncode == 130, stopped.stderr[-4000:]
        assert "SIGINT again: quitting now" in stopped.stderr, stopped.stderr[-4000:]
        assert "Traceback" not in stopped.stderr, stopped.stderr[-4000:]
        assert not left_over(first.marker, grace_s=30)  # no process of its Ray instance survives
        # ...nor the killed engine's adapter directory in /dev/shm (it cannot remove it itself; train does).
        engine_pid = json.loads((out / "placement.json").read_text())["runs"][0]["engines"][0]["pid"]
        where = Path(shm.shm_root() or tempfile.gettempdir())  # where the engine made it (tempfile.mkdtemp)
        assert not list(where.glob(f"{shm.prefix_for(engine_pid)}*"))
        assert 2 <= checkpointed_step(out, 1) < STEPS[0], "the stop was to land part-way through iteration 1"
        started.append(second := Train([*args, "--resume"]))
        resumed = second.finish(timeout=600)
    finally:
        for train in started:
            train.kill()
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "run 1 of iteration 1 resumes at step" in resumed.stderr
    return out


def test_one_shared_engine_samples_every_run_with_its_own_adapter(lora_run: Path, tiny_model_dir: Path) -> None:
    placement = json.loads((lora_run / "placement.json").read_text())
    assert [g for g in placement["groups"] if "engine" in g] == ["shared/engine-1"]
    (engine_1,), (engine_2,) = (run["engines"] for run in placement["runs"])
    assert engine_1["pid"] == engine_2["pid"]  # the same vLLM engine serves both runs

    metrics = pq.read_table(lora_run / "metrics.parquet").to_pylist()
    assert sorted((r["iteration"], r["run"], r["step"]) for r in metrics) == [
        (i, m, t) for i in (1, 2) for m in (1, 2) for t in range(STEPS[i - 1])
    ]  # every step once, across the stop
    # A step moves the adapter alone: 2 layers × 7 target matrices × (A + B) in bf16 (the run's dtype), not the model.
    from merger.checkpoint import Checkpoint

    with Checkpoint(tiny_model_dir) as checkpoint:
        model_bytes = sum(e.nbytes for e in checkpoint.entries.values())
        shapes = [shape for name, (_, shape) in checkpoint.layout.items() if name.endswith("proj.weight")]
    adapter_bytes = sum(2 * RANK * (rows + columns) for rows, columns in shapes)
    assert {r["sync_bytes"] for r in metrics} == {adapter_bytes} and adapter_bytes < model_bytes / 10
    # Had an engine sampled a run's prompts with the other run's adapter (or none, or on the wrong base after
    # the resume), the learner's log-probs of the sampled tokens would differ from the sampler's by about the
    # runs' KL per token (here up to 4 nats a sequence of 16 tokens), not by bf16 rounding (measured ≤ 0.008).
    assert max(r["drift_max"] for r in metrics) < 0.05
    assert any(r["kl"] > 0.01 for r in metrics)  # the adapters did move the policies apart from the anchor
    samples = pq.read_table(lora_run / "samples").to_pylist()
    assert {(s["iteration"], s["step"], s["version"]) for s in samples} == {
        (i, t, BASE[i] + t) for i in (1, 2) for t in range(STEPS[i - 1])
    }  # on-policy before and after the resume


def test_a_runs_policy_is_its_saved_adapter_on_its_iterations_init(lora_run: Path) -> None:
    """The saved adapter (fp32 factors, gathered from the ZeRO-2 ranks' partitions) on its iteration's θ_init is
    the saved policy: W_init + s·B·A formed in fp32 on both sides."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from warp_rlhf.models import resolve_model

    out = RunDir(lora_run)
    for i in (1, 2):
        init = resolve_model("tiny-llama", dtype="bfloat16") if i == 1 else out.init(i - 1)  # θ_sft in the run's dtype
        for m in (1, 2):
            adapter = out.adapter(i, m)
            config = json.loads((adapter / "adapter_config.json").read_text())
            assert Path(config["base_model_name_or_path"]) == Path(init).resolve()
            base = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
            merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
            policy = AutoModelForCausalLM.from_pretrained(out.policy(i, m), dtype=torch.float32).state_dict()
            assert max(float((merged[n] - policy[n]).abs().max()) for n in policy) < 1e-6


def test_serving_a_runs_adapter_answers_as_its_policy(lora_run: Path, tmp_path: Path) -> None:
    out = RunDir(lora_run)
    with served(out.adapter(2, 1), tmp_path) as client:
        assert sorted(m.id for m in client.models.list().data) == ["policy", "policy-base"]
        for model, reference in (("policy", out.policy(2, 1)), ("policy-base", out.init(1))):
            reply = client.completions.create(model=model, prompt="The film", max_tokens=8, temperature=0,
                                              extra_body={"return_token_ids": True})  # fmt: skip
            choice = reply.choices[0]
            expected = _greedy_reference(reference, choice.model_extra["prompt_token_ids"], 8)
            assert choice.model_extra["token_ids"] == expected, model
