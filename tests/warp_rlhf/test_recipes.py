"""Every shipped recipe trains end to end in miniature, at its own settings.

The bugs the 7B review found hid because every test ran at settings under which they vanish. Here each config in
`configs/` runs `train` on the tiny model with its own ZeRO stage, threshold, dtype (`auto` included), transport,
LoRA and checkpointing settings; only the model, the number of steps and the prompts per step are shrunk, and the
ranks are capped at 2. Where the others are trained:
- `configs/smoke.yaml`: the stop chain (tests/warp_rlhf/conftest.py), killed, interrupted and resumed;
- `configs/gpu-7b.yaml`: on the simulated multi-node cluster with its node roles (tests/warp_rlhf/test_cluster.py);
- `configs/demo.yaml`, `demo-fp32.yaml` and `demo-lora.yaml`: here, one after another in one process and one local
  Ray instance (warp_rlhf.cluster.shared_local_ray: one Ray start-up for the three).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("demo", "demo-fp32", "demo-lora")
SHRINK = ["model.path=tiny-llama", "warp.steps=2", "warp.prompts_per_step=4", "actors.max_model_len=128"]
SHIPPED = {path.stem for path in (ROOT / "configs").glob("*.yaml")}
ELSEWHERE = {"smoke", "gpu-7b"}

TRAIN_ALL = r"""
import json, logging, sys
from warp_rlhf.cluster import shared_local_ray
from warp_rlhf.config import load_config
from warp_rlhf.loop import train

root, shrink, names = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
configs = [load_config(f"configs/{n}.yaml", [*shrink, f"output.dir={root}/{n}"]) for n in names]
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
with shared_local_ray([(cfg, None) for cfg in configs]):
    for cfg in configs:
        train(cfg)
"""


def test_every_shipped_recipe_is_trained_somewhere() -> None:
    assert set(RECIPES) | ELSEWHERE == SHIPPED, "a new config in configs/ needs a miniature run"


@pytest.fixture(scope="module")
def recipes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    result = subprocess.run([sys.executable, "-c", TRAIN_ALL, str(root), json.dumps(SHRINK), *RECIPES], cwd=ROOT,
                            capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return root


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_trains_at_its_own_settings(recipes: Path, name: str) -> None:
    out = recipes / name
    shipped = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    ran = yaml.safe_load((out / "config.yaml").read_text())
    for section in ("learners", "warp", "actors", "reward"):  # the recipe's own settings, but for the shrunk ones
        for key, value in shipped.get(section, {}).items():
            if f"{section}.{key}" in {s.split("=")[0] for s in SHRINK}:
                continue
            if isinstance(value, dict):  # a subsection (learners.lora): the keys the recipe sets
                assert {k: ran[section][key][k] for k in value} == value, f"{name}: {section}.{key}"
            else:
                assert ran[section][key] == value, f"{name}: {section}.{key}"
    iterations = ran["warp"]["iterations"]
    metrics = pq.read_table(out / "metrics.parquet").to_pylist()
    assert sorted((r["iteration"], r["run"], r["step"]) for r in metrics) == [
        (i, m, t) for i in range(1, iterations + 1) for m in (1, 2) for t in range(2)
    ]
    assert not any(r["skipped"] for r in metrics)
    for i in range(1, iterations + 1):
        for sub in ("run-1", "run-2", "slerp", "init"):
            assert (out / f"iter-{i}" / sub / "config.json").is_file(), f"{name}: iter-{i}/{sub}"
        # Rollouts spilled to Parquet as they came, whatever warp.checkpoint_every (demo-fp32's is 0).
        for m in (1, 2):
            files = sorted((out / "samples" / f"iter-{i}" / f"run-{m}").glob("steps-*.parquet"))
            assert files and {r["step"] for f in files for r in pq.read_table(f).to_pylist()} == {0, 1}
            assert not list((out / "samples" / f"iter-{i}" / f"run-{m}").glob(".*"))  # no open spill left
    if ran["learners"]["lora"]["rank"]:
        assert (out / "iter-1" / "adapters" / "run-1" / "adapter_config.json").is_file()
    record = json.loads((out / "placement.json").read_text())
    assert len(record["runs"]) == 2
