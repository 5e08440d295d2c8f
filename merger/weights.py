"""Weight-space maths of WARP: LERP and SLERP of task vectors, and LITI.

Pure functions on ``dict[str, Tensor]`` (HF checkpoint names → tensors) plus the per-tensor building
blocks the streaming merge reuses. Every merge is written as θ_init + Σ_m c_m δ_m with task vectors
δ_m = θ_m − θ_init: SLERP only decides the coefficients c, from the task vectors' Gram matrix. That
one form covers M = 1, 2 and the iterative M > 2 scheme, the degenerate cases, and the ``global``
granularity (sum the per-tensor Gram matrices, then apply one set of coefficients everywhere).

Compute is float32 whatever the storage dtype, in cache-sized blocks (Gram matrices accumulate in
float64 across blocks); results come back in the input dtype. The angle maths runs on M×M matrices in
float64 Python scalars. Imports torch only: never ray, vllm or deepspeed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch

Weights = Mapping[str, torch.Tensor]

# Below this sin Ω the two task vectors are (anti)collinear: SLERP's division is ill-conditioned and its
# limit is LERP, which we use instead. The Gram matrix is accumulated in float32 blocks, so cos Ω carries
# ~1e-7 relative error, and for (anti)parallel vectors sin Ω = √(1 − cos²Ω) reads ~5e-4 instead of 0,
# which SLERP would turn into coefficients of ~1e3 on cancelling vectors (seen at Ω = 180° on an AMD EPYC
# without AVX-512). 1e-3 (Ω within 0.06° of 0° or 180°) is beyond that noise; SLERP and LERP agree there.
SIN_EPS = 1e-3
# Elements per block: float32 scratch of 256 KiB per row stays in L2, so the several elementwise
# passes of a merge cost cache bandwidth and only inputs and output go through memory (measured:
# 2.5× faster per element than 1 MiB rows on the 2-core CI machine).
BLOCK = 1 << 16
GRANULARITIES = ("tensor", "global")


def check_same_layout(init: Weights, policies: Sequence[Weights]) -> None:
    """Raise ValueError naming the first tensor whose name or shape differs from ``init``, or is not floating.

    Floating dtypes may differ (fp32 master-weight policies over a bf16 θ_init): the maths is fp32.
    """
    if not policies:
        raise ValueError("need at least one policy to merge")
    for m, policy in enumerate(policies, start=1):
        missing, extra = sorted(set(init) - set(policy)), sorted(set(policy) - set(init))
        if missing:
            raise ValueError(f"tensor {missing[0]!r} is in θ_init but missing from policy {m}")
        if extra:
            raise ValueError(f"tensor {extra[0]!r} is in policy {m} but not in θ_init")
        for name, t in init.items():
            p = policy[name]
            if p.shape != t.shape:
                raise ValueError(f"tensor {name!r}: policy {m} has shape {tuple(p.shape)}, θ_init {tuple(t.shape)}")
            for tensor in (t, p):
                if not tensor.is_floating_point():
                    raise ValueError(f"tensor {name!r}: cannot merge non-floating dtype {tensor.dtype}")


def _blocks(init: torch.Tensor, policies: Sequence[torch.Tensor], block: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(slice, float32 rows [θ_init; θ_1; …; θ_M] (M+1, b)) over one tensor's elements, block by block.

    Casting each block once up front keeps every later op float32-to-float32 (vectorised); ops on
    mixed dtypes run several times slower. The rows buffer is reused: valid until the next block.
    """
    flat = [init.reshape(-1), *(p.reshape(-1) for p in policies)]  # (n,) each
    n = flat[0].numel()
    rows = torch.empty(len(flat), min(block, n), dtype=torch.float32)  # (M+1, b)
    for start in range(0, n, block):
        stop = min(start + block, n)
        view = rows[:, : stop - start]
        for row, source in zip(view, flat, strict=True):
            row.copy_(source[start:stop])
        yield slice(start, stop), view


def tensor_gram(init: torch.Tensor, policies: Sequence[torch.Tensor], block: int = BLOCK) -> torch.Tensor:
    """⟨δ_j, δ_l⟩ of one tensor's task vectors δ_m = θ_m − θ_init, (M, M) float64, one block at a time."""
    g = torch.zeros(len(policies), len(policies), dtype=torch.float64)  # (M, M)
    for _, rows in _blocks(init, policies, block):
        deltas = rows[1:].sub_(rows[0])  # (M, b)
        g += (deltas @ deltas.T).to(torch.float64)  # float32 within a block, float64 across blocks
    return g


def add_task_vectors(
    init: torch.Tensor,
    policies: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    out: torch.Tensor | None = None,
    block: int = BLOCK,
) -> torch.Tensor:
    """θ_init + Σ c_m δ_m of one tensor, into ``out`` (θ_init's dtype and shape), one block at a time.

    Computed in float32 as (1 − Σc) θ_init + Σ c_m θ_m: one BLAS call per block, no δ buffer, exact
    at the ends (c = e_k gives θ_k bit for bit); its rounding (~1e-7 of |θ|) is far below bf16's.
    """
    out = torch.empty_like(init) if out is None else out
    flat_out = out.view(-1)
    c = torch.tensor(coeffs, dtype=torch.float32)  # (M,)
    a0 = 1.0 - math.fsum(coeffs)
    for where, rows in _blocks(init, policies, block):
        # beta · θ_init + (θ_1 … θ_M) @ c: (b,) + (b, M) @ (M,)
        flat_out[where].copy_(torch.addmv(rows[0], rows[1:].T, c, beta=a0))
    return out


def pair_weights(aa: float, ab: float, bb: float, lam: float) -> tuple[float, float]:
    """SLERP weights of (δ_a, δ_b) given ‖δ_a‖², ⟨δ_a, δ_b⟩, ‖δ_b‖²; LERP where the angle is undefined."""
    if not aa > 0.0 or not bb > 0.0:  # a zero task vector: no angle; LERP keeps the other one, scaled
        return 1.0 - lam, lam
    cos = max(-1.0, min(1.0, ab / math.sqrt(aa * bb)))  # float32 rounding can leave [-1, 1]
    omega = math.acos(cos)
    sin = math.sin(omega)
    if sin < SIN_EPS:
        return 1.0 - lam, lam
    return math.sin((1.0 - lam) * omega) / sin, math.sin(lam * omega) / sin


def slerp_coefficients(g: torch.Tensor, lam: float | None = None) -> list[float]:
    """c (M,) with θ_slerp = θ_init + Σ c_m δ_m, from the Gram matrix g (M, M) of the task vectors.

    M = 2: the paper's formula with λ = ``lam`` (default 1/2, the weight of the second policy).
    M > 2: s_2 = slerp(δ_1, δ_2, 1/2), s_k = slerp(s_{k−1}, δ_k, 1/k), in run order (``lam`` must be
    None). s_{k−1} = Σ c_j δ_j, so its norm and its dot with δ_k come from g: no tensor is re-read.
    """
    size = g.shape[0]
    _check_lam(size, lam)
    gm = g.tolist()
    c = [1.0] + [0.0] * (size - 1)
    for k in range(1, size):
        step_lam = lam if lam is not None else 1.0 / (k + 1)
        ss = sum(c[i] * c[j] * gm[i][j] for i in range(k) for j in range(k))  # ‖s_{k−1}‖²
        sd = sum(c[i] * gm[i][k] for i in range(k))  # ⟨s_{k−1}, δ_k⟩
        wa, wb = pair_weights(ss, sd, gm[k][k], step_lam)
        c = [wa * ci for ci in c]
        c[k] = wb
    return c


def _check_lam(size: int, lam: float | None) -> None:
    if lam is None:
        return
    if size > 2:
        raise ValueError(f"lam = {lam} is only for two policies; {size} policies use λ = 1/k at step k")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam = {lam}: must be in [0, 1]")


def slerp(
    init: Weights, policies: Sequence[Weights], lam: float | None = None, granularity: str = "tensor"
) -> dict[str, torch.Tensor]:
    """SLERP of the policies' task vectors: one angle per tensor, or one for the whole model (``global``)."""
    check_same_layout(init, policies)
    _check_lam(len(policies), lam)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity = {granularity!r}: must be one of {GRANULARITIES}")
    if len(policies) == 1:
        return {name: t.clone() for name, t in policies[0].items()}
    grams = {name: tensor_gram(t, [p[name] for p in policies]) for name, t in init.items()}  # (M, M) each
    shared = slerp_coefficients(sum(grams.values()), lam) if granularity == "global" else None
    out = {}
    for name, t in init.items():
        coeffs = shared if shared is not None else slerp_coefficients(grams[name], lam)
        out[name] = add_task_vectors(t, [p[name] for p in policies], coeffs)
    return out


def lerp(init: Weights, policies: Sequence[Weights], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """θ_init + Σ w_m δ_m; uniform w = 1/M by default (then it is the plain average of the policies)."""
    check_same_layout(init, policies)
    coeffs = lerp_coefficients(len(policies), weights)
    return {name: add_task_vectors(t, [p[name] for p in policies], coeffs) for name, t in init.items()}


def lerp_coefficients(size: int, weights: Sequence[float] | None = None) -> list[float]:
    if weights is None:
        return [1.0 / size] * size
    if len(weights) != size:
        raise ValueError(f"{len(weights)} LERP weights for {size} policies")
    return [float(w) for w in weights]


def liti(init: Weights, merged: Weights, eta: float) -> dict[str, torch.Tensor]:
    """(1 − η) θ_init + η θ_merged, elementwise: the next iteration's θ_init (exact at η = 0 and η = 1)."""
    check_eta(eta)
    check_same_layout(init, [merged])
    return {name: add_task_vectors(t, [merged[name]], [eta]) for name, t in init.items()}


def check_eta(eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta = {eta}: must be in [0, 1]")
