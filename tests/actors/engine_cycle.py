"""Starts, uses and shuts down an engine several times in a fresh process; prints what is left after each.

Run by test_lifecycle.py as ``python -m tests.actors.engine_cycle MODEL_DIR CYCLES MULTIPROCESSING``.
"""

from __future__ import annotations

import json
import sys
import time

STARTED = time.time()


def _state() -> dict:
    """This process's children, and the shared memory created since it started that nothing holds (leaked)."""
    import psutil

    from tests.processes import unheld_shm

    children = sorted((p.pid, p.name()) for p in psutil.Process().children(recursive=True))
    return {"children": children, "shm": unheld_shm(since=STARTED)}


def main(model_dir: str, cycles: int, multiprocessing: bool) -> None:
    from actors.engine import GenerationEngine
    from tests.actors.conftest import hf_greedy, random_weights
    from warp_rlhf.config import ActorsConfig

    cfg = ActorsConfig(kv_cache_gib=0.125, max_model_len=128, max_new_tokens=8, multiprocessing=multiprocessing)
    model, flat = random_weights(model_dir, seed=3)
    report = {"before": _state(), "during": [], "after": [], "greedy_is_the_loaded_model": []}
    for cycle in range(cycles):
        engine = GenerationEngine(model_dir, cfg, dtype="float32", seed=cycle)
        engine.load_weights(flat, version=cycle + 1)
        rows = engine.generate(["The film opens"], n=2).column("version").to_pylist()
        assert rows == [cycle + 1] * 2, rows
        # The weights really landed (a multiprocess engine takes them through a /dev/shm file, not the RPC).
        greedy = engine.generate(["The film opens"], n=1, temperature=0.0).to_pylist()[0]
        same = greedy["completion_ids"] == hf_greedy(model, greedy["prompt_ids"], cfg.max_new_tokens)
        report["greedy_is_the_loaded_model"].append(same)
        report["during"].append(_state())
        engine.shutdown()
        report["after"].append(_state())
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
