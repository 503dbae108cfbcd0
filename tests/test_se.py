"""SE blocks: shapes and dtypes, gating behaviour, and the paper's equations in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scse_jax.models.se import AGGREGATIONS, ChannelSE, ChannelSpatialSE, SpatialSE

SETTINGS = settings(deadline=None, max_examples=20, derandomize=True)


@st.composite
def feature_maps(draw, min_abs=0.0):
    """(seed, array) with random batch, 2-D or 3-D odd/even spatial sizes and channels."""
    rank = draw(st.sampled_from([2, 3]))
    batch = draw(st.integers(1, 3))
    spatial = tuple(draw(st.integers(1, 7)) for _ in range(rank))
    channels = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *spatial, channels))
    if min_abs:
        # Keep away from zero so out/in ratios are well defined.
        x = np.sign(x + 1e-12) * (min_abs + np.abs(x))
    return seed, x.astype(np.float32)


def random_params(block, x, seed: int):
    """Normal draws (biases included, to exercise every term) in the shapes block.init gives.

    Shapes come from jax.eval_shape, so no random-number kernels are compiled.
    """
    shapes = jax.eval_shape(block.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


def run(block, params, x) -> np.ndarray:
    """block's output for x, compiled as one XLA program (faster than op-by-op here)."""
    return np.asarray(jax.jit(block.apply)({"params": params}, x))


def blocks(reduction: int, aggregation: str):
    return [ChannelSE(reduction), SpatialSE(), ChannelSpatialSE(reduction, aggregation)]


@SETTINGS
@given(
    data=feature_maps(),
    reduction=st.integers(1, 8),
    aggregation=st.sampled_from(AGGREGATIONS),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_blocks_keep_shape_and_dtype(data, reduction, aggregation, dtype):
    seed, x = data
    x = jnp.asarray(x, dtype)
    for block in blocks(reduction, aggregation):
        shapes = jax.eval_shape(block.init, jax.random.key(0), x)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes)), block
        y = jax.jit(block.apply)({"params": random_params(block, x, seed)}, x)
        assert y.shape == x.shape, block
        assert y.dtype == x.dtype, block
        assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32)))), block


def test_blocks_work_with_no_arguments_and_few_channels():
    x = jnp.ones((2, 5, 3, 1))
    for block in (ChannelSE(), SpatialSE(), ChannelSpatialSE()):
        y = block.apply(block.init(jax.random.key(0), x), x)
        assert y.shape == x.shape
    params = ChannelSE(reduction=16).init(jax.random.key(0), x)["params"]
    assert params["squeeze"]["kernel"].shape == (1, 1)  # bottleneck never below one unit


@SETTINGS
@given(data=feature_maps(min_abs=0.5), reduction=st.integers(1, 4))
def test_channel_se_scales_each_channel_by_one_factor_in_unit_interval(data, reduction):
    seed, x = data
    block = ChannelSE(reduction)
    y = run(block, random_params(block, x, seed), x)
    ratio = (y / x).reshape(x.shape[0], -1, x.shape[-1])  # (N, locations, C)
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-5)
    assert np.all((ratio > 0) & (ratio < 1))


@SETTINGS
@given(data=feature_maps(min_abs=0.5))
def test_spatial_se_scales_each_location_by_one_factor_in_unit_interval(data):
    seed, x = data
    block = SpatialSE()
    y = run(block, random_params(block, x, seed), x)
    ratio = y / x
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[..., :1], ratio.shape), rtol=1e-5)
    assert np.all((ratio > 0) & (ratio < 1))


@SETTINGS
@given(
    data=feature_maps(), reduction=st.integers(1, 4), aggregation=st.sampled_from(AGGREGATIONS)
)
def test_scse_aggregates_its_own_branches(data, reduction, aggregation):
    seed, x = data
    block = ChannelSpatialSE(reduction, aggregation)
    params = random_params(block, x, seed)
    assert set(params) == {"cse", "sse"}
    channel = run(ChannelSE(reduction), params["cse"], x)
    spatial = run(SpatialSE(), params["sse"], x)
    expected = {"max": np.maximum, "add": np.add, "mul": np.multiply}[aggregation](channel, spatial)
    np.testing.assert_allclose(run(block, params, x), expected, rtol=1e-6, atol=1e-7)


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def paper_cse(u, w2, b2, w1, b1):
    """U_cSE = sigma(zhat) u with z_k = mean of u_k, zhat = W1 delta(W2 z) (TMI 2019, eq. 1)."""
    spatial_axes = tuple(range(1, u.ndim - 1))
    z = u.mean(axis=spatial_axes)  # (N, C)
    zhat = np.maximum(z @ w2 + b2, 0.0) @ w1 + b1
    return sigmoid(zhat).reshape(u.shape[:1] + (1,) * len(spatial_axes) + u.shape[-1:]) * u


def paper_sse(u, w_sq, b_sq):
    """U_sSE = sigma(q) u with q = W_sq * U, a 1x1 convolution to one channel."""
    q = np.tensordot(u, w_sq.reshape(-1), axes=([-1], [0])) + b_sq
    return sigmoid(q)[..., None] * u


@SETTINGS
@given(data=feature_maps(), reduction=st.integers(1, 4))
def test_blocks_match_the_papers_equations(data, reduction):
    seed, x = data
    block = ChannelSpatialSE(reduction, "max")
    params = random_params(block, x, seed)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    u = x.astype(np.float64)
    cse = paper_cse(
        u, p["cse"]["squeeze"]["kernel"], p["cse"]["squeeze"]["bias"],
        p["cse"]["excite"]["kernel"], p["cse"]["excite"]["bias"],
    )
    sse = paper_sse(u, p["sse"]["squeeze"]["kernel"], p["sse"]["squeeze"]["bias"])
    tol = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(ChannelSE(reduction), params["cse"], x), cse, **tol)
    np.testing.assert_allclose(run(SpatialSE(), params["sse"], x), sse, **tol)
    np.testing.assert_allclose(run(block, params, x), np.maximum(cse, sse), **tol)


def test_parameter_shapes_follow_the_paper():
    x = jnp.ones((1, 4, 4, 4, 12))  # 3-D
    params = ChannelSpatialSE(reduction=3).init(jax.random.key(0), x)["params"]
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes == {
        "cse": {
            "squeeze": {"kernel": (12, 4), "bias": (4,)},
            "excite": {"kernel": (4, 12), "bias": (12,)},
        },
        "sse": {"squeeze": {"kernel": (1, 1, 1, 12, 1), "bias": (1,)}},
    }


def test_bfloat16_compute_with_float32_params():
    x = jnp.ones((2, 4, 4, 6), jnp.float32)
    block = ChannelSpatialSE(dtype=jnp.bfloat16)
    variables = block.init(jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    y = block.apply(variables, x)
    assert y.dtype == jnp.float32  # output keeps the input's dtype
    reference = ChannelSpatialSE().apply(variables, x)
    np.testing.assert_allclose(y, reference, rtol=2e-2)


@pytest.mark.parametrize("block", [ChannelSE(), SpatialSE(), ChannelSpatialSE()], ids=str)
@pytest.mark.parametrize("shape", [(8,), (2, 8)])
def test_low_rank_input_is_a_clear_error(block, shape):
    with pytest.raises(ValueError, match="rank >= 3"):
        block.init(jax.random.key(0), jnp.ones(shape))


def test_unknown_aggregation_is_a_clear_error():
    with pytest.raises(ValueError, match="aggregation.*'mean'"):
        ChannelSpatialSE(aggregation="mean")


@pytest.mark.parametrize("reduction", [0, -2, 1.5])
def test_bad_reduction_is_a_clear_error(reduction):
    with pytest.raises(ValueError, match="reduction"):
        ChannelSE(reduction=reduction)
    with pytest.raises(ValueError, match="reduction"):
        ChannelSpatialSE(reduction=reduction)
