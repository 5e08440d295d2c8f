"""HF-format safetensors checkpoints, read and written one tensor at a time.

Owns: opening a model directory (one ``model.safetensors``, several ``*.safetensors``, or shards
listed in ``model.safetensors.index.json``) and reading it tensor by tensor; writing one atomically
(a temporary directory in the same parent, renamed into place when complete), sharded above a size,
with config, generation config and tokenizer files carried over from a reference directory; refusing
checkpoints whose architecture differs before anything is written; converting between HF directories
and FlatWeights.

The safetensors format (8-byte header length, JSON header, raw little-endian data) is parsed and
written here rather than through ``safe_open``/``save_file``: a read is one ``preadv`` into a buffer
we own (``safe_open`` maps the file, and every page a merge touches would then stay resident until
the file is closed, i.e. a whole model per input), and a write streams tensors into a file whose
header is known in advance, where ``save_file`` needs a whole shard in memory. Tests cross-check both
directions against the safetensors library, transformers and vLLM.

Pickle weights (``*.bin``) are never loaded. Imports numpy at module level and torch lazily (the CLI
imports this module); never ray, vllm or deepspeed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from merger.errors import CheckpointError
from merger.flat import FlatWeights, TensorSpec, allocate, layout_specs

if TYPE_CHECKING:
    import torch

# fmt: off
SAFETENSORS_DTYPES = {  # safetensors code → torch dtype name (one table row per line reads better)
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}
CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
# Bytes per element; every other dtype above has 1.
ITEMSIZE = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2, "bfloat16": 2, "int16": 2}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
MAX_HEADER = 100 << 20  # the safetensors library's own limit; a larger "header" is a corrupt file
# Everything besides weights that `vllm serve` and `from_pretrained` read from an LM directory.
CARRIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
# fmt: on

Layout = dict[str, tuple[str, tuple[int, ...]]]  # name → (torch dtype name, shape), in storage order


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * ITEMSIZE.get(dtype, 1)


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # torch dtype name: "bfloat16", ...
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: Path) -> list[Entry]:
    """The tensors of one safetensors file in storage order, every offset checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, MAX_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    entries = [_entry(path, name, info, 8 + length, size) for name, info in header.items() if name != "__metadata__"]
    return sorted(entries, key=lambda e: e.start)


def _entry(path: Path, name: str, info: object, data_start: int, size: int) -> Entry:
    try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]  # type: ignore[index]
        shape = tuple(int(d) for d in info["shape"])  # type: ignore[index]
        begin, end = (int(x) for x in info["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has an unsupported header entry {info!r}") from None
    nbytes = tensor_nbytes(dtype, shape)
    if begin < 0 or end - begin != nbytes or data_start + end > size:
        raise CheckpointError(f"{path}: tensor {name!r}: data offsets {begin}..{end} do not fit its shape or the file")
    return Entry(name, dtype, shape, path, data_start + begin, nbytes)


class Checkpoint:
    """One HF model directory opened for reading, one tensor at a time (use as a context manager)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = read_config(self.path)
        self.entries: dict[str, Entry] = {}
        for file in weight_files(self.path):
            for entry in read_header(file):
                if entry.name in self.entries:
                    raise CheckpointError(f"{self.path}: tensor {entry.name!r} is stored twice")
                self.entries[entry.name] = entry
        self._fds: dict[Path, int] = {}

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def layout(self) -> Layout:
        return {e.name: (e.dtype, e.shape) for e in self.entries.values()}

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Read tensor ``name``'s bytes into ``out`` ((nbytes,) uint8, e.g. a slice of a FlatWeights buffer)."""
        entry = self.entries[name]
        if entry.file not in self._fds:
            self._fds[entry.file] = os.open(entry.file, os.O_RDONLY)
        view, done = memoryview(out).cast("B"), 0
        while done < entry.nbytes:  # preadv may return short counts; it keeps no file position (thread-safe)
            n = os.preadv(self._fds[entry.file], [view[done:]], entry.start + done)
            if n == 0:
                raise CheckpointError(f"{entry.file}: file ends inside tensor {name!r}")
            done += n

    def tensor(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name``, read into ``buffer`` ((≥ nbytes,) uint8, reused by streaming callers) or a new one."""
        import torch

        entry = self.entries[name]
        raw = torch.empty(entry.nbytes, dtype=torch.uint8) if buffer is None else buffer[: entry.nbytes]
        self.read_into(name, raw.numpy())
        return raw.view(getattr(torch, entry.dtype)).view(entry.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"{path}: {'not a directory' if path.exists() else 'does not exist'}")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json, not a Hugging Face model directory") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: config.json is unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config.json is not a JSON object")
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a directory: those its index names, else every ``*.safetensors``."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: not a valid index (expected a JSON weight_map)") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard {missing[0]!r} named in {INDEX_FILE} is missing")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
        raise CheckpointError(
            f"{path}: holds only pickle weights (*.bin); we never unpickle weights. "
            "Convert it to safetensors first (save_pretrained(..., safe_serialization=True))"
        )
    raise CheckpointError(f"{path}: no *.safetensors weights")


def check_same_layout(ref: Layout, other: Layout, ref_label: str, label: str, dtypes: bool = True) -> None:
    """Raise CheckpointError naming the first tensor that ``other`` lacks, adds, or stores differently."""
    missing, extra = [n for n in ref if n not in other], [n for n in other if n not in ref]
    if missing:
        raise CheckpointError(f"{label}: tensor {missing[0]!r} of {ref_label} is missing ({len(missing)} in all)")
    if extra:
        raise CheckpointError(f"{label}: tensor {extra[0]!r} is not in {ref_label} ({len(extra)} in all)")
    for name, (dtype, shape) in ref.items():
        other_dtype, other_shape = other[name]
        if other_shape != shape:
            raise CheckpointError(f"{label}: tensor {name!r} has shape {other_shape}, {ref_label} has {shape}")
        if dtypes and other_dtype != dtype:
            raise CheckpointError(f"{label}: tensor {name!r} has dtype {other_dtype}, {ref_label} has {dtype}")


def check_compatible(reference: Checkpoint, others: list[Checkpoint], dtypes: bool = False) -> None:
    """Refuse checkpoints whose model type, tensor names, shapes (with ``dtypes``: dtypes) differ from the reference.

    Dtypes may differ by default: a run's policies are fp32 master weights over a model-dtype θ_init, and
    the merge computes in fp32 and writes each tensor as wide as its widest input (``merged_layout``).
    """
    for other in others:
        if other.model_type != reference.model_type:
            raise CheckpointError(
                f"{other.path}: model_type {other.model_type!r} differs from {reference.model_type!r} "
                f"in {reference.path}"
            )
        check_same_layout(reference.layout, other.layout, str(reference.path), str(other.path), dtypes=dtypes)


def plan_shards(layout: Layout, shard_bytes: int) -> list[list[str]]:
    """Consecutive groups of tensors of at most ``shard_bytes`` each (a bigger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (dtype, shape) in layout.items():
        nbytes = tensor_nbytes(dtype, shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def check_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not (overwrite and out_dir.is_dir()):
        raise CheckpointError(f"output {out_dir}: already exists; remove it or choose another directory")


class CheckpointWriter:
    """Writes one HF directory tensor by tensor, in ``layout`` order, under a temporary name.

    A context manager: the directory appears at ``out_dir`` only when the block ends normally with
    every tensor written; on any exception (or a missing tensor) the temporary directory is removed,
    so readers never see a half-written checkpoint. Config, generation config and tokenizer files
    come from ``reference_dir``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        layout: Layout,
        reference_dir: str | Path,
        shard_size_mb: int = 2048,
        overwrite: bool = False,
    ) -> None:
        self.out_dir, self.reference_dir, self.layout = Path(out_dir), Path(reference_dir), layout
        self.overwrite = overwrite
        if shard_size_mb < 1:
            raise CheckpointError(f"shard size {shard_size_mb} MB: must be >= 1")
        check_output(self.out_dir, overwrite)
        read_config(self.reference_dir)
        self.shards = plan_shards(layout, shard_size_mb * 1_000_000)  # MB as in HF's max_shard_size
        self._order = [name for shard in self.shards for name in shard]
        self._shard_of = {name: i for i, shard in enumerate(self.shards) for name in shard}
        self._written = 0
        self._file = None
        self._tmp: Path | None = None

    def shard_name(self, i: int) -> str:
        return SINGLE_FILE if len(self.shards) == 1 else f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def __enter__(self) -> CheckpointWriter:
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        # Same parent as the target, so the final rename never crosses a filesystem.
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        expected = self._order[self._written] if self._written < len(self._order) else None
        if name != expected:
            raise CheckpointError(f"{self.out_dir}: got tensor {name!r} but {expected!r} comes next")
        dtype, shape = self.layout[name]
        if (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)) != (dtype, shape):
            raise ValueError(f"tensor {name!r}: {tensor.dtype} {tuple(tensor.shape)} does not match {dtype} {shape}")
        shard = self._shard_of[name]
        if self.shards[shard][0] == name:
            self._open_shard(shard)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # (nbytes,), no copy
        self._file.write(memoryview(data))
        self._written += 1
        if self.shards[shard][-1] == name:
            self._file.close()
            self._file = None

    def _open_shard(self, shard: int) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in self.shards[shard]:
            dtype, shape = self.layout[name]
            nbytes = tensor_nbytes(dtype, shape)
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data must start 8-byte aligned
        self._file = open(self._tmp / self.shard_name(shard), "wb")  # noqa: SIM115 (closed when the shard is full)
        self._file.write(len(text).to_bytes(8, "little") + text)

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            try:
                self._finish()
                return
            except BaseException:
                self._discard()
                raise
        self._discard()

    def _finish(self) -> None:
        if self._written != len(self._order):
            raise CheckpointError(f"{self.out_dir}: only {self._written} of {len(self._order)} tensors were written")
        if len(self.shards) > 1:
            weight_map = {name: self.shard_name(i) for name, i in self._shard_of.items()}
            total = sum(tensor_nbytes(d, s) for d, s in self.layout.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self._tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        carry_files(self.reference_dir, self._tmp, self.layout)
        self._tmp.chmod(0o755)  # mkdtemp makes it 0700; Ray workers and `vllm serve` may run as others
        # No fsync: the rename protects readers from a crashed writer, which is the failure we design
        # for; surviving power loss is left to the filesystem, as `save_pretrained` does.
        if self.out_dir.exists() and self.overwrite:
            old = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=self.out_dir.parent))
            os.replace(self.out_dir, old / "dir")
            os.replace(self._tmp, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self._tmp, self.out_dir)

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def carry_files(reference_dir: Path, out_dir: Path, layout: Layout) -> None:
    """Copy config, generation config and tokenizer files; config.json's dtype follows the weights written."""
    floats = [d for d, _ in layout.values() if d.startswith(("float", "bfloat"))]
    for name in CARRIED_FILES:
        source = reference_dir / name
        if not source.is_file():
            continue
        if name == "config.json" and floats:
            config = json.loads(source.read_text())
            key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
            config[key] = floats[0]  # vLLM's dtype="auto" and from_pretrained read this
            (out_dir / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(source, out_dir / name)


def save_hf(
    weights: FlatWeights | Mapping[str, torch.Tensor],
    out_dir: str | Path,
    reference_dir: str | Path,
    shard_size_mb: int = 2048,
    overwrite: bool = False,
) -> Path:
    """Write in-memory weights as an HF directory; tensor names and shapes must match ``reference_dir``'s."""
    tensors = dict(weights.tensors()) if isinstance(weights, FlatWeights) else dict(weights)
    layout = {name: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in tensors.items()}
    with Checkpoint(reference_dir) as reference:
        check_same_layout(reference.layout, layout, str(reference.path), "weights to save", dtypes=False)
    with CheckpointWriter(out_dir, layout, reference_dir, shard_size_mb, overwrite) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return Path(out_dir)


class CheckpointState(Mapping):
    """An HF directory as a read-only ``name → tensor`` mapping that reads each tensor when it is asked for.

    How a learner takes θ_init from the run directory: it copies each tensor into its parameters and drops it,
    so no rank ever holds a second full model (nor the object store a copy of it). Every lookup reads the file
    again (the page cache serves repeats); ``specs`` are the tensors as FlatWeights would describe them.
    """

    def __init__(self, path: str | Path) -> None:
        self.checkpoint = Checkpoint(path)
        self.path = self.checkpoint.path

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.checkpoint.entries:
            raise KeyError(name)
        return self.checkpoint.tensor(name)

    def __iter__(self):
        return iter(self.checkpoint.entries)

    def __len__(self) -> int:
        return len(self.checkpoint.entries)

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        return layout_specs((e.name, e.dtype, e.shape, e.nbytes) for e in self.checkpoint.entries.values())

    def tensors(self):
        """(name, tensor) in the checkpoint's order, one read each, like ``FlatWeights.tensors``."""
        return ((name, self[name]) for name in self)

    def state_dict(self) -> CheckpointState:
        """Itself, as ``FlatWeights.state_dict`` gives a mapping: the two serve the same callers."""
        return self

    def close(self) -> None:
        self.checkpoint.close()

    def __del__(self) -> None:  # its file descriptors are plain ints: nothing else would close them
        self.close()


def weight_source(weights: FlatWeights | str | Path) -> FlatWeights | CheckpointState:
    """Weights as given, or an HF directory opened for reading a tensor at a time: both have ``specs``,
    ``tensors()`` and ``state_dict()``."""
    return weights if isinstance(weights, FlatWeights) else CheckpointState(weights)


def load_flat(path: str | Path, version: int = 0) -> FlatWeights:
    """Read an HF directory straight into one FlatWeights buffer (no intermediate tensors)."""
    with Checkpoint(path) as checkpoint:
        flat = allocate(((e.name, e.dtype, e.shape, e.nbytes) for e in checkpoint.entries.values()), version)
        for spec in flat.specs:
            checkpoint.read_into(spec.name, flat.buffer[spec.offset : spec.offset + spec.nbytes])
    return flat
