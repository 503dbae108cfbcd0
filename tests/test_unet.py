"""The U-Net: shapes, parameter counts, SE overhead, BatchNorm modes, errors, summary."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scse_jax.models import summary
from scse_jax.models.cpu_ops import CpuConv3x3
from scse_jax.models.layers import Conv3x3
from scse_jax.models.unet import (
    DEEP_SUPERVISION, DEFAULT_SE_POSITIONS, SE_KINDS, SE_POSITIONS, UNet, auxiliary_logits, count_params,
)


def double_conv_params(cin: int, cout: int) -> int:
    """Two bias-free 3x3 convolutions, each with BatchNorm scale and offset."""
    return 9 * cin * cout + 9 * cout * cout + 4 * cout


def se_params(kind: str, channels: int, reduction: int) -> int:
    hidden = max(1, channels // reduction)
    cse = channels * hidden + hidden + hidden * channels + channels
    sse = channels + 1
    return {"none": 0, "cse": cse, "sse": sse, "scse": cse + sse}[kind]


def expected_params(
    *, features, in_channels, num_classes, upsample="bilinear", se="none", reduction=2,
    positions=DEFAULT_SE_POSITIONS,
):
    """Trainable parameters of the architecture described in the UNet docstring."""
    widths = [features * 2**level for level in range(4)]
    up_kernel_area = 9 if upsample == "bilinear" else 4
    total, cin = 0, in_channels
    se_channels = {"encoder": list(widths), "bottleneck": [16 * features], "decoder": list(widths)}
    for width in widths:
        total += double_conv_params(cin, width)
        cin = width
    total += double_conv_params(8 * features, 16 * features)
    for width in widths:
        total += up_kernel_area * 2 * width * width + width  # upsampling conv with bias
        total += double_conv_params(2 * width, width)
    total += features * num_classes + num_classes
    for position in positions:
        total += sum(se_params(se, c, reduction) for c in se_channels[position])
    return total


def image(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_variables(model, seed=0):
    """Variables in the shapes model.init gives, filled from numpy.

    A jitted model.init compiles the random-number kernels for every parameter, which takes
    tens of seconds on a small CPU; the tests only need some values of the right shapes.
    """
    x = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "batch_stats" in jax.tree_util.keystr(path[:1]):
            return jnp.full(leaf.shape, 1.0 if "var" in name else 0.0, leaf.dtype)
        fan_in = math.prod(leaf.shape[:-1]) or 1
        return jnp.asarray(rng.normal(size=leaf.shape) / math.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("se", SE_KINDS)
@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_output_shape_at_two_resolutions(se, upsample, size):
    model = UNet(num_classes=3, features=4, se=se, upsample=upsample)
    x = jax.ShapeDtypeStruct((2, *size, 1), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    assert logits.shape == (2, *size, 3)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
def test_forward_pass_runs_at_two_resolutions(upsample):
    model = UNet(num_classes=2, features=4, se="scse", upsample=upsample)
    variables = random_variables(model)
    apply = jax.jit(functools.partial(model.apply, train=False))
    for size in (32, 48):
        logits = apply(variables, image((2, size, size, 1)))
        assert logits.shape == (2, size, size, 2)
        assert logits.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(features=16, in_channels=1, num_classes=5, se="none"),
        dict(features=16, in_channels=1, num_classes=2, se="none", upsample="transpose"),
        dict(features=8, in_channels=3, num_classes=5, se="scse"),
        dict(features=8, in_channels=1, num_classes=2, se="cse", reduction=16),
        dict(features=4, in_channels=2, num_classes=5, se="sse", positions=("bottleneck",)),
        dict(features=4, in_channels=1, num_classes=3, se="scse", positions=("decoder",),
             upsample="transpose", reduction=3),
    ],
    ids=str,
)
def test_parameter_count_matches_the_architecture(kwargs):
    kwargs = {"upsample": "bilinear", "reduction": 2, "positions": SE_POSITIONS, **kwargs}
    counted = summary.unet_param_count(
        num_classes=kwargs["num_classes"],
        features=kwargs["features"],
        in_channels=kwargs["in_channels"],
        se=kwargs["se"],
        se_reduction=kwargs["reduction"],
        se_positions=kwargs["positions"],
        upsample=kwargs["upsample"],
    )
    assert counted == expected_params(**kwargs)


def test_se_overhead_at_features_16():
    report_placement = summary.se_param_counts(
        num_classes=5, features=16, se_positions=summary.REPORT_SE_POSITIONS
    )
    overhead = report_placement["scse"] / report_placement["none"] - 1
    assert 0.01 < overhead < 0.05  # the report: "about 2%"
    everywhere = summary.se_param_counts(num_classes=5, features=16)
    assert everywhere["none"] == report_placement["none"]
    bottleneck_se = se_params("scse", 16 * 16, 2)
    assert everywhere["scse"] - report_placement["scse"] == bottleneck_se
    assert everywhere["none"] < everywhere["sse"] < everywhere["cse"] < everywhere["scse"]


def test_overhead_table_lists_every_kind_with_its_percentage():
    counts = {"none": 1000, "cse": 1020, "sse": 1001, "scse": 1021}
    table = summary.overhead_table(counts)
    assert "1,020" in table and "2.00%" in table and "2.10%" in table and "0.10%" in table
    assert [line.split()[0] for line in table.splitlines()[1:]] == list(SE_KINDS)


def test_summary_command_prints_a_table(capsys):
    summary.main(["--features", "4", "--num-classes", "2", "--positions", "encoder"])
    out = capsys.readouterr().out
    counts = summary.se_param_counts(num_classes=2, features=4, se_positions=("encoder",))
    assert f"{counts['scse']:,}" in out and "SE after encoder" in out


def test_summary_counts_the_deep_supervision_heads_when_asked(capsys):
    plain = summary.se_param_counts(num_classes=5, features=16)
    supervised = summary.se_param_counts(num_classes=5, features=16, deep_supervision=True)
    heads = (32 + 1) * 5 + (64 + 1) * 5  # 1x1 convolutions with bias on dec2 (32 wide) and dec3 (64 wide)
    assert {kind: supervised[kind] - plain[kind] for kind in plain} == {kind: heads for kind in plain}
    summary.main(["--features", "16", "--num-classes", "5", "--positions", "encoder", "decoder", "--deep-supervision"])
    out = capsys.readouterr().out
    assert "deep supervision" in out
    assert f"{summary.se_param_counts(num_classes=5, features=16, se_positions=('encoder', 'decoder'), deep_supervision=True)['scse']:,}" in out


def test_se_blocks_sit_only_at_the_chosen_positions():
    x = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)

    def top_level_names(**kwargs):
        model = UNet(num_classes=2, features=4, **kwargs)
        variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
        return set(variables["params"])

    plain = {"enc1", "enc2", "enc3", "enc4", "bottleneck", "dec4", "dec3", "dec2", "dec1", "head"}
    assert top_level_names() == plain
    assert top_level_names(se="scse", se_positions=("bottleneck", "decoder")) == plain | {
        "bottleneck_se", "dec4_se", "dec3_se", "dec2_se", "dec1_se"
    }
    assert top_level_names(se="cse", se_positions=()) == plain


def test_count_params():
    tree = {"a": np.zeros((2, 3)), "b": [np.zeros(4), jax.ShapeDtypeStruct((5, 1), jnp.float32)]}
    assert count_params(tree) == 15


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = UNet(num_classes=2, features=4, se="scse", se_positions=SE_POSITIONS, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    assert logits.dtype == jnp.float32
    jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, x)
    convolutions = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "conv_general_dilated"]
    operand_dtypes = [tuple(v.aval.dtype for v in eqn.invars) for eqn in convolutions]
    result_dtypes = {eqn.outvars[0].aval.dtype for eqn in convolutions}
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    # 18 block convolutions (the 4 decoder ones that read skip + upsampled as two) and 4
    # upsampling ones in bfloat16; the head and the 9 sSE squeezes in float32
    assert operand_dtypes.count((bf16, bf16)) == 18 + 4 + 4
    assert operand_dtypes.count((f32, f32)) == 1 + 9
    assert result_dtypes == {f32}  # bfloat16 operands accumulate in float32


def test_bfloat16_transposed_convolutions_round_their_output_to_bfloat16():
    """Unlike the 3x3 convolutions, nn.ConvTranspose returns its operand dtype; UpBlock casts
    the rounded result to float32."""
    model = UNet(num_classes=2, features=4, upsample="transpose", dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, x)
    convolutions = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "conv_general_dilated"]
    transposed = [eqn for eqn in convolutions if any(d > 1 for d in eqn.params["lhs_dilation"])]
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    assert len(transposed) == 4
    assert {eqn.outvars[0].aval.dtype for eqn in transposed} == {bf16}
    assert {eqn.outvars[0].aval.dtype for eqn in convolutions if eqn not in transposed} == {f32}
    assert jax.eval_shape(functools.partial(model.apply, train=False), variables, x).dtype == f32


@pytest.fixture(scope="module")
def trained_model():
    """A tiny scSE U-Net, its initial variables and jitted train/eval applies."""
    model = UNet(num_classes=2, features=4, se="scse")
    train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    evaluate = jax.jit(functools.partial(model.apply, train=False, mutable=["batch_stats"]))
    return random_variables(model, seed=7), train, evaluate


def test_init_creates_params_and_initial_batch_statistics():
    model = UNet(num_classes=2, features=4, se="sse")
    variables = model.init(jax.random.key(0), image((1, 16, 16, 1)), train=False)
    assert set(variables) == {"params", "batch_stats"}
    assert count_params(variables["params"]) == expected_params(
        features=4, in_channels=1, num_classes=2, se="sse"
    )
    stats = variables["batch_stats"]["enc1"]["bn1"]
    np.testing.assert_array_equal(stats["mean"], np.zeros(4))
    np.testing.assert_array_equal(stats["var"], np.ones(4))


def test_train_mode_updates_batch_statistics_with_momentum(trained_model):
    variables, train, _ = trained_model
    x = image((3, 32, 32, 1), seed=1) + 2.0
    _, updates = train(variables, x)
    old, new = variables["batch_stats"], updates["batch_stats"]
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), old, new)
    assert all(jax.tree.leaves(changed))
    # enc1's first BatchNorm sees conv1(x); its running mean starts at 0, momentum 0.9.
    kernel = variables["params"]["enc1"]["conv1"]["kernel"]
    conv = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(
        new["enc1"]["bn1"]["mean"], 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )


def test_train_mode_normalises_with_the_batch(trained_model):
    variables, train, _ = trained_model
    a, b = image((2, 32, 32, 1), seed=2), image((2, 32, 32, 1), seed=3) * 3.0
    first, _ = train(variables, a)
    mixed, _ = train(variables, jnp.concatenate([a[:1], b[1:]]))
    assert not np.allclose(first[0], mixed[0], atol=1e-4)


def test_eval_mode_uses_running_statistics_unchanged(trained_model):
    variables, train, evaluate = trained_model
    _, updates = train(variables, image((3, 32, 32, 1), seed=4))
    variables = {**variables, **updates}
    a, b = image((2, 32, 32, 1), seed=5), image((2, 32, 32, 1), seed=6) * 3.0
    out, after = evaluate(variables, a)
    again, _ = evaluate(variables, a)
    mixed, _ = evaluate(variables, jnp.concatenate([a[:1], b[1:]]))
    unchanged = jax.tree.map(
        lambda x, y: bool(jnp.array_equal(x, y)), variables["batch_stats"], after["batch_stats"]
    )
    assert all(jax.tree.leaves(unchanged))
    np.testing.assert_array_equal(out, again)
    np.testing.assert_allclose(out[0], mixed[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(30, 32), (32, 40), (8, 8)])
def test_input_side_not_divisible_by_16_is_a_clear_error(size):
    model = UNet(num_classes=2, features=4)
    x = jax.ShapeDtypeStruct((1, *size, 1), jnp.float32)
    with pytest.raises(ValueError, match=f"divisible by 16, got {size[0]}x{size[1]}"):
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 1), (1, 1, 32, 32, 1)])
def test_wrong_input_rank_is_a_clear_error(shape):
    model = UNet(num_classes=2, features=4)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    with pytest.raises(ValueError, match="rank 4"):
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(se="se"), "se"),
        (dict(upsample="nearest"), "upsample"),
        (dict(se="scse", se_aggregation="mean"), "aggregation"),
        (dict(se_positions=("middle",)), "se_positions"),
        (dict(se_positions="encoder"), "se_positions"),
        (dict(se_reduction=0), "reduction"),
        (dict(features=0), "features"),
    ],
    ids=str,
)
def test_bad_configuration_is_a_clear_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UNet(num_classes=2, **kwargs)


@pytest.mark.parametrize("conv", [Conv3x3, CpuConv3x3], ids=lambda conv: conv.__name__)
def test_a_double_conv_block_is_conv_batch_norm_relu_twice(conv):
    from scse_jax.models.unet import DoubleConv

    block = DoubleConv(6, conv=conv)
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    variables = block.init(jax.random.key(0), images, train=False)
    # Moved running statistics, so that eval mode's normalisation is not the identity.
    stats = jax.tree.map(lambda leaf: leaf + 0.3, variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}

    def conv_bn_relu(x, i):
        kernel = variables["params"][f"conv{i}"]["kernel"]
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        bn, running = variables["params"][f"bn{i}"], stats[f"bn{i}"]
        y = (y - running["mean"]) / jnp.sqrt(running["var"] + 1e-5) * bn["scale"] + bn["bias"]
        return jax.nn.relu(y)

    expected = conv_bn_relu(conv_bn_relu(images, 1), 2)
    np.testing.assert_allclose(block.apply(variables, images, train=False), expected, atol=1e-4, rtol=1e-4)


def test_unet_defaults_agree_with_the_default_config():
    from configs import default

    model_config = default.get_config().model
    model = UNet(num_classes=2)
    assert tuple(model.se_positions) == tuple(model_config.se_positions) == summary.REPORT_SE_POSITIONS
    for field in ("features", "se_reduction", "se_aggregation", "upsample"):
        assert getattr(model, field) == model_config[field], field


def test_deep_supervision_sows_coarser_logits_and_leaves_the_output_alone():
    plain = UNet(num_classes=3, features=4, se="scse")
    supervised = UNet(num_classes=3, features=4, se="scse", deep_supervision=True)
    variables = random_variables(supervised)
    assert DEEP_SUPERVISION in variables  # init sows too; what it sowed must not come back below
    heads = {"dec2_head": 2 * 4 * 3 + 3, "dec3_head": 4 * 4 * 3 + 3}  # 1x1 convolutions with bias
    assert set(variables["params"]) - set(random_variables(plain)["params"]) == set(heads)
    assert count_params(variables["params"]) == count_params(random_variables(plain)["params"]) + sum(heads.values())

    x = image((2, 32, 48, 1))
    logits, updates = supervised.apply(variables, x, train=True, mutable=["batch_stats", DEEP_SUPERVISION])
    coarse = auxiliary_logits(updates)
    assert [c.shape for c in coarse] == [(2, 16, 24, 3), (2, 8, 12, 3)]  # finest first
    assert all(c.dtype == jnp.float32 for c in coarse)
    trunk = {
        "params": {k: v for k, v in variables["params"].items() if k not in heads},
        "batch_stats": variables["batch_stats"],
    }
    plain_logits, _ = plain.apply(trunk, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(logits, plain_logits)
    # inference: the same logits, nothing sown
    np.testing.assert_array_equal(supervised.apply(variables, x, train=False), plain.apply(trunk, x, train=False))
    assert auxiliary_logits(plain.apply(trunk, x, train=True, mutable=["batch_stats", DEEP_SUPERVISION])[1]) == []


def test_deep_supervision_loss_trains_the_heads_that_the_plain_loss_leaves_alone():
    from scse_jax import losses

    model = UNet(num_classes=3, features=4, deep_supervision=True)
    variables = random_variables(model)
    x = image((2, 32, 32, 1))
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 3, size=(2, 32, 32)), jnp.int32)

    def head_gradient_norms(deep):
        def loss(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                mutable=["batch_stats", DEEP_SUPERVISION],
            )
            outputs = [logits, *auxiliary_logits(updates)] if deep else [logits]
            return losses.deep_supervision_loss(outputs, labels, jnp.ones(3))[0]

        grads = jax.grad(loss)(variables["params"])
        return [float(optax.tree_utils.tree_norm(grads[name])) for name in ("dec2_head", "dec3_head", "head")]

    deep, plain = head_gradient_norms(True), head_gradient_norms(False)
    assert all(g > 0 for g in deep)
    assert plain[:2] == [0.0, 0.0] and plain[2] > 0
