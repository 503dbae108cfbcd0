"""Pictures of a run: loss points from metrics records, figures written atomically."""

from matplotlib.figure import Figure

from scse_jax import plots


def test_loss_points_are_one_splits_losses_in_epoch_order():
    records = [
        {"split": "val", "epoch": 2, "loss": 0.5}, {"split": "train", "epoch": 2, "loss": 0.4},
        {"split": "train", "epoch": 1, "loss": 0.9}, {"split": "val", "epoch": 1, "dice": 0.3},
    ]
    assert plots.loss_points(records, "train") == [(1, 0.9), (2, 0.4)]
    assert plots.loss_points(records, "val") == [(2, 0.5)]


def test_save_figure_writes_the_named_format_and_leaves_no_temporary_file(tmp_path):
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    path = plots.save_figure(fig, tmp_path / "sub" / "curve.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in path.parent.iterdir()] == ["curve.png"]


def test_plot_loss_curves_writes_a_png(tmp_path):
    records = [{"split": "train", "epoch": e, "loss": 1.0 / e} for e in (1, 2, 3)]
    assert plots.plot_loss_curves(records, tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_save_figure_at_a_given_dpi_or_the_figures_own(tmp_path):
    from PIL import Image

    fig = Figure(figsize=(2, 1), dpi=40)
    fig.subplots().plot([0, 1], [1, 0])
    with Image.open(plots.save_figure(fig, tmp_path / "own.png")) as own:
        assert own.size == (80, 40)
    with Image.open(plots.save_figure(fig, tmp_path / "set.png", dpi=120)) as given:
        assert given.size == (240, 120)
