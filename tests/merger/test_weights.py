"""The pure maths: SLERP of task vectors, LERP, LITI, their degenerate cases and their errors."""

from __future__ import annotations

import math

import pytest
import torch

from merger import lerp, liti, slerp
from merger.weights import BLOCK, add_task_vectors, slerp_coefficients, tensor_gram


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(8, 16, generator=g).to(dtype),
        "b.weight": torch.randn(3 * BLOCK + 5, generator=g).to(dtype),  # several blocks, a ragged last one
        "c.bias": torch.randn(7, generator=g).to(dtype),
    }


def _orthogonal_pair(t: torch.Tensor, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two task vectors for ``t``: orthogonal, of equal norm ``scale``."""
    g = torch.Generator().manual_seed(seed)
    a, b = (
        torch.randn(t.numel(), generator=g, dtype=torch.float64),
        torch.randn(t.numel(), generator=g, dtype=torch.float64),
    )
    b -= (a @ b) / (a @ a) * a
    return (scale * a / a.norm()).reshape(t.shape), (scale * b / b.norm()).reshape(t.shape)


def _policies_from(init: dict, deltas: list[dict]) -> list[dict]:
    return [{n: (init[n].double() + d[n]).to(init[n].dtype) for n in init} for d in deltas]


def test_endpoints_give_the_policies_exactly() -> None:
    init, p1, p2 = _model(0), _model(1), _model(2)
    for name, t in slerp(init, [p1, p2], lam=0.0).items():
        assert torch.equal(t, p1[name])
    for name, t in slerp(init, [p1, p2], lam=1.0).items():
        assert torch.equal(t, p2[name])


def test_orthogonal_task_vectors_get_sin_ratio_weights_and_keep_their_norm() -> None:
    init = {n: t.double() for n, t in _model(0).items()}
    pairs = {n: _orthogonal_pair(t, scale=0.1 * (i + 1), seed=i) for i, (n, t) in enumerate(init.items())}
    init32 = {n: t.float() for n, t in init.items()}
    p1, p2 = _policies_from(init32, [{n: a for n, (a, _) in pairs.items()}, {n: b for n, (_, b) in pairs.items()}])
    merged = slerp(init32, [p1, p2])
    weight = math.sin(math.pi / 4) / math.sin(math.pi / 2)  # ≈ 0.7071
    for name, (a, _) in pairs.items():
        tv = merged[name].double() - init32[name].double()
        expected = weight * ((p1[name].double() - init32[name].double()) + (p2[name].double() - init32[name].double()))
        torch.testing.assert_close(tv, expected, atol=2e-6, rtol=1e-4)
        assert tv.norm().item() == pytest.approx(a.norm().item(), rel=1e-4)  # SLERP keeps the norm
    shrunk = lerp(init32, [p1, p2])  # LERP, by contrast, shrinks it by 0.7071
    for name, (a, _) in pairs.items():
        norm = (shrunk[name].double() - init32[name].double()).norm().item()
        assert norm == pytest.approx(weight * a.norm().item(), rel=1e-4)


def test_coefficients_of_an_orthogonal_gram_matrix() -> None:
    c = slerp_coefficients(torch.eye(2, dtype=torch.float64))
    assert c == pytest.approx([math.sqrt(0.5)] * 2)
    c = slerp_coefficients(torch.eye(2, dtype=torch.float64), lam=0.25)
    assert c == pytest.approx([math.sin(0.75 * math.pi / 2), math.sin(0.25 * math.pi / 2)])


def test_three_policies_equal_the_nested_two_way_construction() -> None:
    init, p1, p2, p3 = _model(0), _model(1), _model(2), _model(3)
    direct = slerp(init, [p1, p2, p3])
    nested = slerp(init, [slerp(init, [p1, p2], lam=0.5), p3], lam=1 / 3)
    for name in init:
        torch.testing.assert_close(direct[name], nested[name], atol=1e-5, rtol=1e-5)


def test_one_policy_is_returned_as_is() -> None:
    init, p1 = _model(0), _model(1)
    for name, t in slerp(init, [p1]).items():
        assert torch.equal(t, p1[name]) and t.data_ptr() != p1[name].data_ptr()


@pytest.mark.parametrize("factor", [2.0, 1.0, -1.0])
def test_collinear_task_vectors_fall_back_to_lerp(factor: float) -> None:
    init, p1 = _model(0), _model(1)
    p2 = {n: init[n] + factor * (p1[n] - init[n]) for n in init}
    merged = slerp(init, [p1, p2], lam=0.3)
    for name in init:
        expected = init[name] + (0.7 + 0.3 * factor) * (p1[name] - init[name])
        assert torch.isfinite(merged[name]).all()
        torch.testing.assert_close(merged[name], expected, atol=1e-5, rtol=1e-5)


def test_zero_task_vectors_never_give_nan() -> None:
    init, p2 = _model(0), _model(2)
    merged = slerp(init, [dict(init), p2], lam=0.25)  # run 1 did not move: LERP keeps run 2's vector, scaled
    for name in init:
        torch.testing.assert_close(merged[name], init[name] + 0.25 * (p2[name] - init[name]), atol=1e-6, rtol=1e-6)
    for name, t in slerp(init, [dict(init), dict(init)]).items():  # nothing moved at all
        assert torch.equal(t, init[name])
    frozen = {n: init[n].clone() for n in init}
    frozen["c.bias"] = _model(5)["c.bias"]  # one frozen tensor elsewhere: per-tensor angles stay finite
    assert all(torch.isfinite(t).all() for t in slerp(init, [frozen, p2]).values())


def test_bfloat16_inputs_are_computed_in_float32_and_returned_in_bfloat16() -> None:
    init, p1, p2 = (_model(s, torch.bfloat16) for s in range(3))
    merged = slerp(init, [p1, p2])
    as32 = [{n: t.float() for n, t in m.items()} for m in (init, p1, p2)]
    reference = slerp(as32[0], as32[1:])
    for name in init:
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], reference[name].to(torch.bfloat16))


def test_global_granularity_uses_one_angle_for_the_whole_model() -> None:
    init, p1, p2 = _model(0), _model(1), _model(2)
    p2["c.bias"] = init["c.bias"] + 3.0 * (p1["c.bias"] - init["c.bias"])  # collinear in one tensor only
    merged = slerp(init, [p1, p2], granularity="global")
    flat = {"all": torch.cat([t.reshape(-1) for t in init.values()])}
    as_one = slerp(flat, [{"all": torch.cat([p[n].reshape(-1) for n in init])} for p in (p1, p2)])["all"]
    torch.testing.assert_close(torch.cat([merged[n].reshape(-1) for n in init]), as_one, atol=1e-6, rtol=1e-6)
    per_tensor = slerp(init, [p1, p2])
    assert not torch.allclose(per_tensor["c.bias"], merged["c.bias"])


def test_gram_and_sum_are_blockwise_exact() -> None:
    init, p1, p2 = _model(0)["b.weight"], _model(1)["b.weight"], _model(2)["b.weight"]
    d = torch.stack([p1 - init, p2 - init]).double()
    torch.testing.assert_close(tensor_gram(init, [p1, p2]), d @ d.T, rtol=1e-5, atol=1e-3)
    out = add_task_vectors(init, [p1, p2], [0.25, 0.5])
    torch.testing.assert_close(out, init + 0.25 * (p1 - init) + 0.5 * (p2 - init), atol=1e-5, rtol=1e-5)


def test_lerp_is_the_average_by_default_and_takes_weights() -> None:
    init, p1, p2 = _model(0), _model(1), _model(2)
    for name, t in lerp(init, [p1, p2]).items():
        torch.testing.assert_close(t, (p1[name] + p2[name]) / 2)
    for name, t in lerp(init, [p1, p2], weights=[1.0, 0.0]).items():
        assert torch.equal(t, p1[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liti_ends_and_middle(dtype: torch.dtype) -> None:
    init, merged = _model(0, dtype), _model(1, dtype)
    for name, t in liti(init, merged, 0.0).items():
        assert torch.equal(t, init[name])
    for name, t in liti(init, merged, 1.0).items():
        assert torch.equal(t, merged[name])
    for name, t in liti(init, merged, 0.3).items():
        expected = (0.7 * init[name].float() + 0.3 * merged[name].float()).to(dtype)
        assert t.dtype == dtype
        torch.testing.assert_close(t, expected, atol=1e-6, rtol=1e-6 if dtype == torch.float32 else 1e-2)


def test_mismatches_raise_value_errors_naming_the_tensor() -> None:
    init, p1 = _model(0), _model(1)
    missing = {n: t for n, t in p1.items() if n != "c.bias"}
    with pytest.raises(ValueError, match="'c.bias'.*missing from policy 2"):
        slerp(init, [p1, missing])
    with pytest.raises(ValueError, match="'extra'.*not in θ_init"):
        lerp(init, [{**p1, "extra": torch.zeros(1)}])
    with pytest.raises(ValueError, match="'a.weight'.*shape"):
        slerp(init, [p1, {**p1, "a.weight": torch.zeros(16, 8)}])
    with pytest.raises(ValueError, match="'a.weight'.*non-floating"):
        liti(init, {**p1, "a.weight": p1["a.weight"].long()}, 0.5)
    mixed = liti(init, {**p1, "a.weight": p1["a.weight"].double()}, 0.5)  # floating dtypes may differ
    assert mixed["a.weight"].dtype == init["a.weight"].dtype
    ints = {"steps": torch.zeros(3, dtype=torch.int64)}
    with pytest.raises(ValueError, match="'steps'.*non-floating"):
        slerp(ints, [ints, ints])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda i, p: slerp(i, [p, p, p], lam=0.5), "only for two policies"),
        (lambda i, p: slerp(i, [p, p], lam=1.5), r"must be in \[0, 1\]"),
        (lambda i, p: slerp(i, [p, p], granularity="layer"), "granularity"),
        (lambda i, p: slerp(i, []), "at least one policy"),
        (lambda i, p: lerp(i, [p, p], weights=[1.0]), "1 LERP weights for 2 policies"),
        (lambda i, p: liti(i, p, -0.1), r"eta = -0.1: must be in \[0, 1\]"),
    ],
)
def test_bad_arguments_raise_value_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(_model(0), _model(1))
