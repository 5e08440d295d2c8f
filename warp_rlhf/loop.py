"""The WARP loop (Algorithm 1 of warp-method.md), read top to bottom:

    for each iteration i:  every run m resets to θ_init (policy and EMA anchor)
        for each step t:   draw prompts → generate (run m's vLLM pool) → score → learner step → sync pool
        θ_slerp ← SLERP(θ_init, {θ_m}, λ);  θ_init ← LITI(θ_init, θ_slerp, η);  broadcast θ_init

The M runs of an iteration run concurrently, one driver thread each, over their own Ray actors, each
learner and engine in its own placement group. Weights never pass through the driver: after a step
the learner publishes them (into the object store, or broadcast by its rank 0 to the engines), and
θ_init is the merger's result on disk, ``iter-<i>/init``, which every learner rank and engine reads a
tensor at a time. Rollouts travel as Arrow tables, and are spilled to Parquet as they come. Resume state is
written every ``warp.checkpoint_every`` steps and at iteration ends; where every actor ran is recorded
in ``placement.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warp_rlhf.config import Config
from warp_rlhf.data import PromptSampler, load_prompts
from warp_rlhf.hardware import emulated_warning, resolve_dtype
from warp_rlhf.models import check_model_matches, resolve_model
from warp_rlhf.outputs import MetricsLog, RunDir, SampleSpill, is_complete_checkpoint, write_atomic
from warp_rlhf.resume import prepare_run_dir, recorded_dtype, resolved
from warp_rlhf.signals import StopOnSignal
from warp_rlhf.startup import StartupTimes

log = logging.getLogger("warp_rlhf")


class RunStopped(Exception):
    """A run stopped at a step boundary because another run failed; its progress is checkpointed."""


@dataclass
class Run:
    """One of the M RL runs: a learner group, the actor pool that samples for it, its prompt order."""

    index: int  # m, 1-based
    learner: Any  # learners.LearnerGroup
    pool: Any  # actors.ActorPool
    sampler: PromptSampler | None = None
    version: int = 0  # weights version the pool holds


class Trainer:
    """Holds what one `warp-rlhf train` needs across iterations: config, outputs, actors, merger."""

    def __init__(
        self,
        cfg: Config,
        out: RunDir,
        sft_dir: Path,
        prompts: list[str],
        progress: Any,
        placement: Any,
        stop: threading.Event,
        startup: StartupTimes,
    ) -> None:
        from actors import make_reward
        from merger.checkpoint import Checkpoint

        self.cfg, self.out, self.sft_dir, self.prompts, self.progress = cfg, out, sft_dir, prompts, progress
        self.placement = placement  # warp_rlhf.cluster.RunPlacement
        self.startup = startup
        self.reward = make_reward(cfg.reward, placement_group=placement.get("reward"))
        self.metrics = MetricsLog(out.metrics, out.root / "tensorboard" if cfg.output.tensorboard else None)
        self.runs: list[Run] = []
        self.stop = stop  # set (by a failing run or by Ctrl-C): every run stops at its next step boundary
        self.anchor_ref: Any = None  # warp.anchor = sft: θ_sft's directory, every run's fixed anchor
        with Checkpoint(sft_dir) as checkpoint:  # what a full-weight sync sends to each engine
            self.model_bytes = sum(entry.nbytes for entry in checkpoint.entries.values())

    def start_runs(self) -> None:
        """Every run's engines and learner ranks start at once, each in its group; then wait for them all."""
        import ray

        from actors import ActorPool
        from learners import LearnerGroup

        cfg, dtype = self.cfg, self.cfg.model.dtype
        seeds = [cfg.seed + 7919 * m for m in range(1, cfg.warp.runs + 1)]  # runs differ only by seed and prompts
        began = time.perf_counter()
        lora, shared = cfg.learners.lora, cfg.actors.share_engines
        slots = (cfg.warp.runs if shared else 1) if lora.enabled else 0  # LoRA slots per engine: one per run served
        pools = [
            ActorPool(self.sft_dir, cfg.actors, dtype=dtype, seed=seed, placement_groups=self.placement.engines(m),
                      wait=False, max_loras=slots, max_lora_rank=lora.rank)
            for m, seed in ([(0, cfg.seed)] if shared else enumerate(seeds, start=1))
        ]  # fmt: skip
        pools *= cfg.warp.runs if shared else 1  # every run holds the one shared pool
        for m, (pool, seed) in enumerate(zip(pools, seeds, strict=True), start=1):
            learner = LearnerGroup(
                self.sft_dir,
                cfg.learners,
                beta=cfg.warp.beta,
                temperature=cfg.actors.temperature,
                sampler_logprobs=cfg.actors.logprobs,
                mu=cfg.warp.mu,
                anchor=cfg.warp.anchor,
                dtype=dtype,
                seed=seed,
                placement_group=self.placement.learner(m),
            )  # fmt: skip
            self.runs.append(Run(m, learner, pool))
        self.startup.record("starting actors", time.perf_counter() - began)
        pending = {ref: "learners" for run in self.runs for ref in (r.ready.remote() for r in run.learner.ranks)}
        engines = {id(engine): engine for run in self.runs for engine in run.pool.engines}.values()
        pending |= {engine.ping.remote(): "engines" for engine in engines}
        while pending:  # whichever finishes first; an actor's start-up error is raised here
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if self.stop.is_set():  # Ctrl-C: nothing to save yet
                raise RunStopped("stopped during start-up")
            for done in ready:
                ray.get(done)
                kind = pending.pop(done)
                if kind not in pending.values():
                    self.startup.record(f"{kind} ready", time.perf_counter() - began)

    def record_placement(self) -> None:
        """placement.json: node and process of every learner rank and engine, the rendezvous, the weight sender."""
        from warp_rlhf.cluster import locate

        runs = []
        for run in self.runs:
            ranks = locate(run.learner.ranks)
            runs.append({
                "run": run.index,
                "master_addr": run.learner.master_addr,
                "master_port": run.learner.master_port,
                "learner_ranks": [dict(where, rank=r) for r, where in enumerate(ranks)],
                "engines": [dict(where, engine=k) for k, where in enumerate(locate(run.pool.engines))],
                "weight_transport": self.cfg.actors.weight_transport,
                "weight_sender": run.learner.sender_info(),
            })  # fmt: skip
        record = {"driver_pid": os.getpid(), "runs": runs, "groups": self.placement.describe()}
        write_atomic(self.out.root / "placement.json", json.dumps(record, indent=2))

    # ------------------------------------------------------------------------------------------------
    # One iteration

    def iteration(self, i: int, init_ref: Any) -> list[Any]:
        """T steps of every run from θ_init, in parallel; returns the runs' final policies (refs or dirs).

        Fail fast: the first run to fail stops the others at their next step boundary (each writes a
        step checkpoint first, so resume loses nothing), then its original exception is raised.
        """
        if self.cfg.actors.share_engines:  # the one base, under every run's adapter slot
            self.runs[0].pool.sync(init_ref, self.version_base(i))
        with ThreadPoolExecutor(len(self.runs), thread_name_prefix="run") as threads:
            futures = [threads.submit(self.train_run, run, i, init_ref) for run in self.runs]
            wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.done() and f.exception() is not None for f in futures):
                self.stop.set()
            wait(futures)
        errors = [f.exception() for f in futures if f.exception() is not None]
        failures = [e for e in errors if not isinstance(e, RunStopped)]
        if failures or errors:
            raise (failures or errors)[0]
        return [f.result() for f in futures]

    def train_run(self, run: Run, i: int, init_ref: Any) -> Any:
        final = self.out.policy(i, run.index)
        if is_complete_checkpoint(final):  # finished before a crash; never recomputed
            self.progress.update(self.cfg.warp.steps_in(i))
            return final
        steps, first = self.cfg.warp.steps_in(i), self.reset_run(run, i, init_ref)
        samples = SampleSpill(self.out, i, run.index, first, self.cfg.output.save_samples)
        for t in range(first, steps):
            if self.stop.is_set():  # another run failed: stop here, resumable from this very step
                if t > first:
                    self.checkpoint(run, i, t, samples)
                raise RunStopped(f"run {run.index} of iteration {i} stopped at step {t}")
            idx = run.sampler.draw(self.cfg.warp.prompts_per_step)
            start = time.perf_counter()
            rollouts = self.generate(run, [self.prompts[k] for k in idx], i, t)
            generated = time.perf_counter()
            stats = run.learner.step(rollouts)
            learned = time.perf_counter()
            run.version += 1
            sent = self.publish(run)
            timings = {"generate_s": generated - start, "learn_s": learned - generated,
                       "sync_s": time.perf_counter() - learned, "sync_bytes": sent}  # fmt: skip
            samples.append(rollouts)
            self.record(run, i, t, rollouts, {**stats, **timings})
            self.startup.first_step()
            if due(self.cfg.output.policy_every, t, steps):
                self.save_policy(run, self.out.snapshot(i, run.index, t + 1))
            if due(self.cfg.warp.checkpoint_every, t, steps):
                self.checkpoint(run, i, t + 1, samples)
                samples = SampleSpill(self.out, i, run.index, t + 1, self.cfg.output.save_samples)
        samples.close(steps - 1)
        self.metrics.flush()  # before the final policy: once it exists, resume never recomputes these steps
        if self.cfg.learners.lora.enabled:  # before the policy: a complete policy means its adapter is there
            self.save_adapter(run, i)
        return self.save_policy(run, final)

    def reset_run(self, run: Run, i: int, init_ref: Any) -> int:
        """Policy and anchor to θ_init, or to the run's last step checkpoint; returns the next step."""
        state = self.out.run_state(i, run.index)
        run.sampler = PromptSampler(len(self.prompts), seed=self.cfg.seed + 104729 * i + run.index)
        progress = state / "progress.json"
        if progress.is_file():
            saved = json.loads(progress.read_text())
            run.learner.load_state(state / "learner", init_ref)
            run.sampler.restore(saved["sampler"])
            run.version = saved["version"]
            if self.cfg.learners.lora.enabled and not self.cfg.actors.share_engines:
                run.pool.sync(init_ref, self.version_base(i))  # the engines' base is θ_init; the adapter goes on top
            self.publish(run)
            log.info("run %d of iteration %d resumes at step %d", run.index, i, saved["step"])
            self.progress.update(saved["step"])
            return int(saved["step"])
        run.learner.load_init(init_ref, anchor=self.anchor_ref)
        run.version = self.version_base(i)
        if not self.cfg.actors.share_engines:  # a shared pool got θ_init once, before the runs started
            run.pool.sync(init_ref, run.version)  # a directory: each engine reads it
        return 0

    def publish(self, run: Run) -> int:
        """The learner's current policy to its engines; returns the bytes sent to each engine.

        Full fine-tuning: the whole model (object store, or the learner's own broadcast). LoRA: the adapter
        alone, megabytes, on top of the θ_init the engines already hold.
        """
        if self.cfg.learners.lora.enabled:
            return run.pool.sync_adapter(run.learner, run.version, run.index)
        run.pool.sync(run.learner, run.version)
        return self.model_bytes

    def version_base(self, i: int) -> int:
        """Weights versions count learner steps across iterations: θ_init of iteration i has this one."""
        return sum(self.cfg.warp.steps_in(k) for k in range(1, i)) + i - 1

    def generate(self, run: Run, prompts: list[str], i: int, t: int) -> Any:
        from actors import score_rollouts
        from actors.engine import prompt_seed

        # A shared engine's own random stream would be drawn by the runs in whichever order their threads
        # come: each run's step gets its own seed instead, so a run's samples do not depend on the others.
        seed = prompt_seed(self.cfg.seed + 7919 * run.index, (i << 32) + t) if self.cfg.actors.share_engines else None
        rollouts = run.pool.generate(prompts, run=run.index, iteration=i, step=t, seed=seed)  # group_id = prompt index
        return score_rollouts(rollouts, self.reward, self.cfg.reward.length_penalty)

    def record(self, run: Run, i: int, t: int, rollouts: Any, stats: dict[str, Any]) -> None:
        import pyarrow.compute as pc

        row = {"iteration": i, "run": run.index, "step": t, "version": run.version}
        row["completion_tokens"] = int(pc.sum(pc.list_value_length(rollouts.column("completion_ids"))).as_py())
        for key, value in stats.items():  # the learner counts its own steps; the driver's (i, m, t) key wins
            if isinstance(value, int | float | bool):
                row["learner_step" if key == "step" else key] = value
        global_step = self.version_base(i) - (i - 1) + t
        self.metrics.append(row, global_step)
        for engine, (mean, peak) in sorted(stats.get("drift_by_engine", {}).items()):
            if mean > self.cfg.actors.drift_warn:  # the weights an engine sampled with are not the learner's
                log.warning("iteration %d run %d step %d: engine %d's log-probs differ from the learner's by %.3g "
                            "per token on average (max %.3g; actors.drift_warn = %g): a partial or stale weight load?",
                            i, run.index, t, engine, mean, peak, self.cfg.actors.drift_warn)  # fmt: skip
        self.progress.update(1)
        self.progress.set_postfix(iter=i, run=run.index, step=t, reward=f"{row.get('reward', 0):.3f}",
                                  kl=f"{row.get('kl', 0):.3f}")  # fmt: skip

    def checkpoint(self, run: Run, i: int, next_step: int, samples: SampleSpill) -> None:
        """Samples since the last checkpoint, metrics, then learner state, then the pointer to it."""
        samples.close(next_step - 1)
        self.metrics.flush()
        state = self.out.run_state(i, run.index)
        run.learner.save_state(state / "learner")  # atomic: written aside, renamed into place
        saved = {"step": next_step, "sampler": run.sampler.state(), "version": run.version}
        write_atomic(state / "progress.json", json.dumps(saved))

    def save_policy(self, run: Run, final: Path) -> Path:
        """The run's policy (its final one, or a snapshot) as HF checkpoint, written by the learner's rank 0
        itself, tensor by tensor; returns the directory the merger streams it from.

        The optimizer's fp32 master weights, not the model-dtype copy the engines sample with: at small
        learning rates a bf16 rounding of θ_m would put independent noise into δ_m = θ_m − θ_init and
        push the SLERP angle towards 90°. The checkpoint's config.json says float32.
        """
        return run.learner.save_policy(final.resolve(), Path(self.sft_dir).resolve(), master=True)

    def save_adapter(self, run: Run, i: int) -> None:
        """The run's fp32 adapter in peft's format, for `vllm serve --lora-modules` on θ_init of iteration i."""
        import ray

        from actors.adapter import save_adapter

        base = self.out.init(i - 1) if i > 1 else self.sft_dir
        adapter = ray.get(run.learner.adapter_ref(run.version, master=True))
        save_adapter(adapter, self.out.adapter(i, run.index), str(Path(base).resolve()))

    # ------------------------------------------------------------------------------------------------

    def shutdown(self, engine_timeout_s: float = 60.0) -> None:
        for run in self.runs:
            run.pool.shutdown(engine_timeout_s)
            run.learner.shutdown()
        self.metrics.close()


def train(cfg: Config, resume: bool = False, force: bool = False) -> Path:
    """Run WARP as configured; returns the output directory."""
    out = RunDir(Path(cfg.output.dir))
    startup = StartupTimes(out.root / "startup.json")
    cfg, why = resolve_dtype(cfg, recorded_dtype(out) if resume else None)
    prompts = load_prompts(cfg.data.train, cfg.data.prompt_column, "train")  # bad input fails before any work
    load_prompts(cfg.data.eval, cfg.data.prompt_column, "eval")
    with startup.phase("θ_sft", announce=False):  # converted once per machine for the packaged model
        sft_dir = resolve_model(cfg.model.path, cfg.model.dtype)
        # dtype, architecture, tokenizer, LoRA targets: before any work
        check_model_matches(sft_dir, cfg.model.dtype, cfg.learners.lora.targets)
    cfg = resolved(cfg, sft_dir)
    done = prepare_run_dir(out, cfg, resume=resume, force=force)
    if done >= cfg.warp.iterations:  # `make demo` run again, say: no Ray, no actors, nothing in the run rewritten
        log.info("%s is complete (%d of %d iterations merged): nothing to train", out.root, done, cfg.warp.iterations)
        return out.root
    report_merge_failure(out)
    # Only now, with the input checked: Ray and torch take seconds to import, a bad input's error does not.
    from tqdm import tqdm

    from merger import MergerService
    from warp_rlhf.cluster import RunPlacement, check_fits, check_shared_storage, connect, owns_ray, shutdown

    log.info("outputs: %s (θ_sft = %s, model.dtype = %s: %s)", out.root.resolve(), sft_dir, cfg.model.dtype, why)
    if warning := emulated_warning(cfg):
        log.warning(warning)
    signals = StopOnSignal(threading.Event())
    signals.install()
    with startup.phase("Ray"):
        started = connect(cfg)
    signals.ray_started = owns_ray()  # a second Ctrl-C kills the instance's processes if this process started it
    signals.install()  # again: ray.init installs its own SIGTERM handler
    placement = trainer = progress = None
    try:
        with signals.stopping(stopped=RunStopped):  # a stop that Ctrl-C caused becomes Interrupted
            with startup.phase("placement groups"):
                placement = RunPlacement(check_fits(cfg, model_dir=sft_dir), cfg.resources.placement_timeout_s)
                inputs = [sft_dir] + ([Path(cfg.reward.path)] if cfg.reward.kind == "hf" else [])
                check_shared_storage(placement, out.root, inputs)  # before any actor: a node that cannot is named
            total = sum(cfg.warp.steps_in(i) for i in range(1, cfg.warp.iterations + 1)) * cfg.warp.runs
            finished = sum(cfg.warp.steps_in(i) for i in range(1, done + 1)) * cfg.warp.runs
            progress = tqdm(total=total, initial=finished, desc="WARP", unit="step", dynamic_ncols=True)
            trainer = Trainer(cfg, out, sft_dir, prompts, progress, placement, signals.stop, startup)
            trainer.metrics.keep(lambda row: row["iteration"] <= done or _before_checkpoint(out, row))
            signals.check()
            trainer.start_runs()
            trainer.record_placement()
            merger = MergerService(cfg, sft_dir, placement_group=placement.get("merger"))
            # θ_init travels as a directory on the shared storage (checked above): every learner rank and engine
            # reads it a tensor at a time; no process holds it whole, the object store never does.
            init_ref = str((out.init(done) if done else sft_dir).resolve())
            if cfg.warp.anchor == "sft":
                trainer.anchor_ref = str(Path(sft_dir).resolve())
            signals.check()
            for i in range(done + 1, cfg.warp.iterations + 1):
                progress.set_description(f"WARP iteration {i}/{cfg.warp.iterations}")
                policies = trainer.iteration(i, init_ref)  # Ctrl-C: the runs stop at their next step boundary
                summary = merger.merge(i, init_ref, policies)  # SLERP then LITI, streamed from and to disk
                merged(out, i, summary)  # a failed merge is recorded and raised before the iteration counts
                init_ref = str(out.init(i).resolve())
                out.mark_completed(i)
                trainer.metrics.flush()
                shutil.rmtree(out.state / f"iter-{i}", ignore_errors=True)
                log.info("iteration %d merged: %s, %s", i, out.slerp(i), out.init(i))
                signals.check()
            trainer.record_placement()  # again: now with the weight senders' broadcast counts
            merger.shutdown()
            log.info("driver peak RSS %.2f GB, the model %.2f GB in its dtype: no model passes through the driver",
                     peak_rss_bytes() / 1e9, trainer.model_bytes / 1e9)  # fmt: skip
    finally:
        if progress is not None:
            progress.close()  # before any last message, so the bar is not redrawn after it
        with signals.cleaning():
            if trainer is not None:  # after Ctrl-C, engines still starting are not waited for
                trainer.shutdown(engine_timeout_s=5.0 if signals.received else 60.0)
            if placement is not None:
                placement.remove()
            if started:
                shutdown()
        signals.restore()
    return out.root


MERGE_FAILURE = "merge-failed.json"


def peak_rss_bytes() -> int:
    """This process's largest resident set so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def merged(out: RunDir, i: int, summary_ref: Any) -> None:
    """Wait for iteration i's merge (its small summary: the merged model stays where it is); on failure, record
    why (resume reports it) and raise."""
    import ray

    failure = out.state / MERGE_FAILURE
    try:
        summary = ray.get(summary_ref)
        log.info("iteration %d merged in %.1f s; the merger's peak RSS %.2f GB for a %.2f GB θ_init", i,
                 summary["seconds"], summary["peak_rss_bytes"] / 1e9, summary["bytes"] / 1e9)  # fmt: skip
    except Exception as exc:
        out.state.mkdir(parents=True, exist_ok=True)
        cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the merger's own exception
        write_atomic(failure, json.dumps({"iteration": i, "error": f"{type(cause).__name__}: {cause}"}))
        raise
    failure.unlink(missing_ok=True)


def report_merge_failure(out: RunDir) -> None:
    """On resume: say that (and why) the last attempt stopped at a merge; the runs' policies are not retrained."""
    failure = out.state / MERGE_FAILURE
    if failure.is_file():
        record = json.loads(failure.read_text())
        log.warning("the last attempt stopped at the merge of iteration %d: %s; its runs' final policies are "
                    "saved, so only the merge is retried", record["iteration"], record["error"])  # fmt: skip


def due(every: int, t: int, steps: int) -> bool:
    """Whether step t's end is an every-th step boundary before the last one (``every`` 0: never); the last
    step ends in the run's final policy, which holds all of it."""
    return every > 0 and (t + 1) % every == 0 and t + 1 < steps


def _before_checkpoint(out: RunDir, row: dict[str, Any]) -> bool:
    """Metrics rows of an unfinished iteration survive a resume only up to the run's last checkpoint."""
    if is_complete_checkpoint(out.policy(row["iteration"], row["run"])):
        return True
    progress = out.run_state(row["iteration"], row["run"]) / "progress.json"
    return progress.is_file() and row["step"] < json.loads(progress.read_text())["step"]
