"""The ``warp-rlhf`` command line: one subcommand per user task, each a small function.

Bad input (config, model, checkpoint, arguments) exits with code 2 and one line naming what is wrong,
before any expensive work starts. Heavy libraries are imported inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from warp_rlhf.config import dump_config, load_config


def input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "the user's input is wrong": printed as one line, exit code 2.

    Imported only when something failed, so `import warp_rlhf.cli` stays light.
    """
    from actors.engine import GenerationError
    from actors.rewards import RewardError
    from merger.errors import CheckpointError
    from warp_rlhf.cluster import ClusterError
    from warp_rlhf.config import ConfigError
    from warp_rlhf.data import PromptError
    from warp_rlhf.evaluate import EvalError
    from warp_rlhf.models import ModelError
    from warp_rlhf.placement import PlacementError
    from warp_rlhf.serve import ServeError

    return (ConfigError, ModelError, CheckpointError, PromptError, RewardError, GenerationError, ClusterError,
            EvalError, ServeError, PlacementError)  # fmt: skip


def _config_show(args: argparse.Namespace) -> int:
    from warp_rlhf.hardware import emulated_warning, resolve_dtype

    config, why = resolve_dtype(load_config(args.config, args.overrides))
    sys.stdout.write(dump_config(config))
    sys.stdout.write(f"# model.dtype = {config.model.dtype}: {why}\n")
    learners = config.learners
    if learners.share_prompts == "auto":
        where = "CPU ranks without ZeRO-3" if learners.shares_prompts else "GPU ranks or ZeRO-3"
        sys.stdout.write(f"# learners.share_prompts = {str(learners.shares_prompts).lower()}: auto: {where}\n")
    if warning := emulated_warning(config):
        sys.stdout.write(f"# warning: {warning}\n")
    return 0


def _add_config(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="inspect configurations")
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="print the resolved configuration as YAML")
    show.add_argument("--config", help="YAML file (defaults only if omitted)")
    show.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides, applied in order")
    show.set_defaults(handler=_config_show)


def _merge(args: argparse.Namespace) -> int:
    from merger.streaming import merge_checkpoints

    out = merge_checkpoints(
        args.init,
        args.policy,
        args.out,
        method=args.method,
        lam=args.lam,
        eta=args.eta,
        granularity=args.granularity,
        shard_size_mb=args.shard_size_mb,
        progress=True,
    )
    print(out)
    return 0


def _add_merge(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "merge",
        help="merge HF checkpoints offline: SLERP or LERP of task vectors, then optionally LITI",
        description="Writes --out, an HF directory (config and tokenizer from --init), streaming tensor by tensor.",
    )
    parser.add_argument("--init", required=True, metavar="DIR", help="θ_init: the task vectors' origin")
    parser.add_argument("--policy", required=True, action="append", metavar="DIR", help="a policy; repeat, in order")
    parser.add_argument("--method", choices=("slerp", "lerp"), default="slerp", help="default: slerp")
    parser.add_argument("--lam", type=float, help="SLERP λ for two policies (default 1/2; M > 2 uses 1/k)")
    parser.add_argument("--eta", type=float, help="write the LITI result (1-η)·θ_init + η·θ_merge instead")
    parser.add_argument(
        "--granularity", choices=("tensor", "global"), default="tensor", help="one SLERP angle per tensor, or in all"
    )
    parser.add_argument("--shard-size-mb", type=int, default=2048, help="largest safetensors shard (default 2048)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    parser.set_defaults(handler=_merge)


def _train(args: argparse.Namespace) -> int:
    from warp_rlhf.loop import train
    from warp_rlhf.signals import EXIT_CODE, Interrupted

    config = load_config(args.config, args.overrides)
    try:
        out = train(config, resume=args.resume, force=args.force)
    except Interrupted as exc:
        again = shlex.join(["warp-rlhf", "train", "--config", args.config, "--resume", *args.overrides])
        print(f"warp-rlhf: {exc}; state saved in {config.output.dir}; continue with: {again}", file=sys.stderr)
        return EXIT_CODE
    print(f"WARP finished: outputs in {out}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="run WARP: I iterations of M RL runs, SLERP, LITI")
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue the run in output.dir after a crash")
    parser.add_argument("--force", action="store_true", help="with --resume: accept a config that differs")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides, applied in order")
    parser.set_defaults(handler=_train)


def _eval(args: argparse.Namespace) -> int:
    from warp_rlhf.evaluate import evaluate, summary

    table = evaluate(args.run, args.overrides)
    print(summary(table))
    print(f"KL-reward front: {args.run}/pareto.parquet, plot: {args.run}/pareto.png")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="KL-reward front of a run's models on held-out prompts")
    parser.add_argument("--run", required=True, help="a run's output directory")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. eval.max_prompts=32")
    parser.set_defaults(handler=_eval)


def _study(args: argparse.Namespace) -> int:
    from warp_rlhf.signals import EXIT_CODE, Interrupted
    from warp_rlhf.study import load_spec, run_study

    spec = load_spec(args.spec, dir=args.dir, seeds=args.seeds)
    command = shlex.join(["warp-rlhf", "study", *sys.argv[2:]]) if sys.argv[1:2] == ["study"] else ""
    try:
        where = run_study(spec, tuple(args.overrides), command)
    except Interrupted as exc:
        print(f"warp-rlhf: {exc}; every finished run is kept and the interrupted one resumes: run the same "
              "command again", file=sys.stderr)  # fmt: skip
        return EXIT_CODE
    print(f"study finished: {where}/study.parquet, report: {where}/report.md, plots: {where}/findings/")
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "study",
        help="arms x seeds of runs, evaluated alike: study.parquet, a plot per finding, report.md",
        description="Trains every (arm, seed) of the spec as its own run directory (resuming unfinished ones, "
        "never retraining finished ones), merges each iteration's LERP offline, evaluates every run on the same "
        "held-out prompts, then decides the paper's findings. Every arm's config is checked before any run.",
    )
    parser.add_argument("--spec", required=True, help="study YAML (see studies/)")
    parser.add_argument("--dir", help="the study's directory, instead of the spec's `dir`")
    parser.add_argument("--seeds", type=seed_list, metavar="S,S,...", help="instead of the spec's seeds, e.g. 0,1")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="applied to every arm, last")
    parser.set_defaults(handler=_study)


def _serve(args: argparse.Namespace) -> int:
    from warp_rlhf.serve import ServeOptions, serve

    opts = ServeOptions(
        model_dir=Path(args.dir),
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        tensor_parallel_size=args.tensor_parallel_size,
        vllm_args=tuple(args.vllm_args),
    )
    serve(opts)  # replaces this process with the server; returns only through an exception
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve a merged policy or a LoRA run's adapter with vLLM's OpenAI-compatible server",
        description="Checks DIR (config, safetensors, tokenizer), then runs vLLM's OpenAI server on it. An adapter "
        "directory is served on its base (named in its adapter_config.json) with vLLM's LoRA support: the base as "
        "NAME-base, base + adapter as NAME. Arguments after --vllm go to vLLM unchanged.",
    )
    parser.add_argument("dir", metavar="DIR", help="an HF checkpoint, e.g. <run>/iter-<I>/init, or a LoRA adapter, "
                        "e.g. <run>/iter-<I>/adapters/run-<M>")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port, default=8000, help="default 8000")
    parser.add_argument("--served-model-name", default="policy", help="the `model` clients ask for (default policy)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="default auto: vLLM's choice on GPU, the stored dtype on CPU",
    )
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    parser.add_argument("--kv-cache-gib", type=float, help="KV cache size (default on CPU 1 GiB; on GPU vLLM's)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per server (default 1)")
    parser.add_argument(
        "--vllm", dest="vllm_args", nargs=argparse.REMAINDER, default=[], metavar="ARG",
        help="last: every argument after --vllm goes to vLLM's server unchanged (e.g. --vllm --max-num-seqs 16)",
    )  # fmt: skip
    parser.set_defaults(handler=_serve)


def _plan(args: argparse.Namespace) -> int:
    from warp_rlhf.hardware import resolve_dtype
    from warp_rlhf.model_size import policy_shape, reward_shape
    from warp_rlhf.placement import local_node, nodes_from_cluster_yaml
    from warp_rlhf.plan import format_plan, plan

    config, _ = resolve_dtype(load_config(args.config, args.overrides))
    nodes = nodes_from_cluster_yaml(args.cluster) if args.cluster else [local_node(config)]
    result = plan(config, nodes, policy_shape(config, args.params, args.model_config), reward_shape(config))
    print(format_plan(result))
    if result.fits:
        return 0
    print(f"warp-rlhf: error: the run does not fit: {'; '.join(result.failures)}", file=sys.stderr)
    return 2


def _add_plan(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "plan",
        help="show where every actor goes and whether it fits in memory; starts nothing",
        description="Places the run's placement groups on the nodes of --cluster (or this machine) and compares "
        "memory estimates with each node's GPUs and RAM. Exit 0 when it fits, 2 when not.",
    )
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("--cluster", metavar="FILE", help="Ray cluster launcher file (default: this machine alone)")
    parser.add_argument(
        "--params", type=parameter_count, metavar="N", help="parameter count, e.g. 7.24e9, when the model is not here"
    )
    parser.add_argument("--model-config", metavar="FILE", help="the model's config.json (or its HF directory)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides, applied in order")
    parser.set_defaults(handler=_plan)


def parameter_count(text: str) -> float:
    """argparse type for --params: a positive number such as 7.24e9."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 7.24e9, got {text!r}") from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def seed_list(text: str) -> list[int]:
    """argparse type for --seeds: comma-separated integers such as 0,1,2."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas such as 0,1,2, got {text!r}") from None


def port(text: str) -> int:
    """argparse type for --port (argparse names the function in its message: "invalid port value")."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {port}")
    return port


PARSERS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_config,
    _add_merge,
    _add_train,
    _add_eval,
    _add_study,
    _add_serve,
    _add_plan,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other input error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="warp-rlhf", description="WARP: weight averaged rewarded policies.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow an option (`train --config c.yaml --resume warp.steps=8`), as a user types them.
    if extra and hasattr(args, "overrides") and all("=" in arg and not arg.startswith("-") for arg in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # any command but train (which stops cleanly on its own): no traceback
        print(f"warp-rlhf: {args.command} interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, input_errors()):
            raise
        print(f"warp-rlhf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
