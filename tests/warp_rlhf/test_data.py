"""Prompt files through pyarrow, the packaged demo split, and resumable per-run prompt order."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from warp_rlhf.data import PromptError, PromptSampler, load_prompts, read_prompt_table


def test_packaged_demo_prompts_have_a_disjoint_held_out_split() -> None:
    train, held_out = load_prompts("", "prompt", "train"), load_prompts("", "prompt", "eval")
    assert len(train) >= 300 and len(held_out) >= 50
    assert not set(train) & set(held_out)


def test_parquet_and_jsonl_with_a_custom_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a b", "c d"], "other": [1, 2]}), tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["x", "y", "z"]))
    assert load_prompts(str(tmp_path / "p.parquet"), "text", "train") == ["a b", "c d"]
    assert load_prompts(str(tmp_path / "p.jsonl"), "text", "train") == ["x", "y", "z"]


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("missing.jsonl", None, "does not exist"),
        ("p.csv", "prompt\na", "expected a .parquet or .jsonl"),
        ("p.jsonl", '{"text": "a"}', "has no column 'prompt' (columns: text); set data.prompt_column"),
        ("p.jsonl", '{"prompt": 3}', "must hold strings"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": " "}', "row 1 has an empty prompt"),
        ("p.jsonl", "{not json", "unreadable"),
    ],
)
def test_bad_prompt_files_name_the_problem(tmp_path: Path, name: str, content: str | None, fragment: str) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(PromptError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        read_prompt_table(tmp_path / name)


def test_sampler_covers_every_prompt_per_epoch_and_resumes_exactly() -> None:
    a = PromptSampler(10, seed=3)
    first_epoch = a.draw(4) + a.draw(6)
    assert sorted(first_epoch) == list(range(10))
    b = PromptSampler(10, seed=3)
    b.draw(7)
    state = b.state()
    c = PromptSampler(10, seed=3)
    c.restore(state)
    assert c.draw(8) == b.draw(8)  # crosses the epoch boundary identically
    assert PromptSampler(10, seed=4).draw(10) != first_epoch  # another run, another order
