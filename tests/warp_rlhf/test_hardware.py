"""model.dtype auto: bf16 only where the hardware computes it natively; resumes keep the run's dtype."""

import subprocess
import sys
from pathlib import Path

import pytest

from warp_rlhf import hardware
from warp_rlhf.config import config_from_dict, load_config
from warp_rlhf.hardware import emulated_warning, native_bf16_cpu, resolve_dtype

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch):
    """Pretend to be a CPU with the given flags."""

    def set_flags(*flags: str) -> None:
        monkeypatch.setattr(hardware, "cpu_info", lambda: ("Test CPU", frozenset({"avx2", *flags})))

    return set_flags


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [((), "float32"), (("avx512f",), "float32"), (("avx512_bf16",), "bfloat16"), (("amx_bf16",), "bfloat16")],
)
def test_auto_is_bf16_only_on_cpus_that_compute_it(cpu, flags: tuple[str, ...], dtype: str) -> None:
    cpu(*flags)
    cfg, why = resolve_dtype(config_from_dict({}))
    assert cfg.model.dtype == dtype
    assert why.startswith("auto: this CPU (Test CPU)")
    assert (flags[0] in why) if dtype == "bfloat16" else ("emulated" in why)


def test_auto_is_the_default_and_a_resume_keeps_the_recorded_dtype(cpu) -> None:
    cpu()
    assert config_from_dict({}).model.dtype == "auto"
    cfg, why = resolve_dtype(config_from_dict({}), recorded="bfloat16")  # started on a CPU with bf16
    assert cfg.model.dtype == "bfloat16" and "resumed" in why


def test_auto_on_gpu_learners_without_a_local_gpu_is_bf16(cpu) -> None:
    cpu()  # a CPU head node driving GPU workers
    cfg, why = resolve_dtype(config_from_dict({"learners": {"num_gpus": 1}}))
    assert cfg.model.dtype == "bfloat16" and "GPUs" in why


def test_explicit_bf16_is_kept_and_warned_about_only_where_emulated(cpu) -> None:
    cpu()
    cfg, why = resolve_dtype(config_from_dict({"model": {"dtype": "bfloat16"}}))
    assert cfg.model.dtype == "bfloat16" and why == "set in the config"
    assert "emulated" in emulated_warning(cfg) and "4x slower" in emulated_warning(cfg)
    cpu("avx512_bf16")
    assert emulated_warning(cfg) is None
    assert emulated_warning(config_from_dict({"model": {"dtype": "float32"}})) is None


def test_this_machines_cpu_flags_are_read() -> None:
    flags = Path("/proc/cpuinfo").read_text()
    expected = "avx512_bf16" in flags.split() or "amx_bf16" in flags.split()
    assert (native_bf16_cpu() is not None) == expected
    assert hardware.cpu_info()[0] != "unknown CPU"


def test_config_show_prints_the_resolved_dtype_and_why() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "warp_rlhf", "config", "show", "--config", "configs/demo.yaml"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    expected = "bfloat16" if native_bf16_cpu() else "float32"
    assert f"  dtype: {expected}\n" in result.stdout
    assert f"# model.dtype = {expected}: auto: this CPU (" in result.stdout
    assert "# learners.share_prompts = true: auto: CPU ranks without ZeRO-3\n" in result.stdout


@pytest.mark.parametrize(("flags", "demo"), [((), "configs/demo-fp32.yaml"), (("avx512_bf16",), "configs/demo.yaml")])
def test_make_demo_trains_the_demo_sized_for_the_dtype_auto_picks(cpu, flags: tuple[str, ...], demo: str) -> None:
    """Where auto picks fp32 the demo does about half the work (configs/demo-fp32.yaml), to stay within 10 minutes."""
    cpu(*flags)
    assert hardware.demo_config() == demo
    cfg, why = resolve_dtype(load_config(ROOT / demo))
    assert why.startswith("auto: ") and cfg.model.dtype == ("bfloat16" if flags else "float32")


def test_make_demo_runs_the_config_of_this_machines_cpu_in_its_own_directory() -> None:
    dry = subprocess.run(["make", "-n", "demo"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    demo = hardware.demo_config()
    out = f"runs/{Path(demo).stem}"
    assert f"train --config {demo} --resume output.dir={out}\n" in dry and f"eval --run {out}\n" in dry
    assert load_config(ROOT / demo).output.dir == out  # the directory the config names, run by hand or by make
