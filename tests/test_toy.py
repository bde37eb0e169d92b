"""The toy law of the paper's section 2.2, through oscqat's own quantizer and tracker."""
import json

import pytest

from oscqat.app.cli import main
from oscqat.app.toy import reversals, run_toy

STEPS = 2000


def test_reversal_counter():
    assert reversals([0, 1, 0, 0, 1, 2, 2, 1]) == 3
    assert reversals([0, 1, 2, 3]) == 0


@pytest.fixture(scope="module")
def ste_runs():
    return {ds: run_toy(w_star=0.3 + ds * 0.1, steps=STEPS) for ds in (0.2, 0.3, 0.4)}


def test_ste_oscillation_frequency_grows_linearly_with_distance(ste_runs):
    for ds, r in ste_runs.items():
        assert r.d_over_s == pytest.approx(ds, abs=1e-6)
        assert r.reversals_per_step == pytest.approx(2 * ds, rel=0.05), ds   # two reversals per s/d steps
        assert r.tracker_freq == pytest.approx(2 * ds, rel=0.1), ds
    rates = [ste_runs[ds].reversals_per_step / ds for ds in (0.2, 0.3, 0.4)]
    assert max(rates) - min(rates) < 0.1


def test_ste_frequency_does_not_depend_on_the_learning_rate():
    slow = run_toy(w_star=0.32, lr=0.005, steps=STEPS)
    fast = run_toy(w_star=0.32, lr=0.02, steps=STEPS)
    assert slow.reversals_per_step == pytest.approx(fast.reversals_per_step, rel=0.05)
    assert slow.reversals_per_step > 0.3


def test_ste_time_mean_of_quantized_weight_approaches_w_star(ste_runs):
    for ds, r in ste_runs.items():
        assert r.mean_quantized == pytest.approx(r.w_star, abs=0.01 * r.scale), ds
        assert not r.frozen


def test_freezing_stops_at_the_closer_grid_point():
    r = run_toy(w_star=0.33, steps=STEPS, method="freeze", f_th=0.02)
    assert r.frozen and r.final_int == 3 and r.reversals_per_step == 0.0
    r = run_toy(w_star=0.37, steps=STEPS, method="freeze", f_th=0.02)
    assert r.frozen and r.final_int == 4


def test_dampening_with_large_lambda_stops_oscillation():
    weak = run_toy(w_star=0.33, steps=STEPS, method="dampen", lam=0.05)
    strong = run_toy(w_star=0.33, steps=STEPS, method="dampen", lam=1.0)
    assert weak.reversals_per_step > 0.1
    assert strong.reversals_per_step == 0.0 and strong.final_int == 3


def test_toy_cli_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "toy.png"
    assert main(["toy", "--steps", "400", "--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("reversals_per_step", "tracker_freq", "mean_quantized", "final_int", "frozen"):
        assert key in out
    assert plot.stat().st_size > 1000


def test_toy_cli_rejects_bad_input(capsys):
    assert main(["toy", "--scale", "0"]) == 2
    assert "scale must be positive" in capsys.readouterr().err
    assert main(["toy", "--bits", "9"]) == 2


def test_toy_plot_shows_latent_weight_and_labels():
    pytest.importorskip("matplotlib")
    from oscqat.app.toy import trace_figure
    trace = {}
    res = run_toy(w_star=0.33, steps=1000, trace=trace)
    fig = trace_figure(trace, res, window=80)
    assert len(fig.axes) == 4                              # 3 panels + the zoom's latent-weight axis
    assert all(ax.get_ylabel() for ax in fig.axes)
    zoom_int, zoom_latent = fig.axes[2], fig.axes[3]
    assert len(zoom_int.lines[0].get_xdata()) == 80        # a window of steps, not a solid block of 1000
    assert set(zoom_int.lines[0].get_ydata()) == {3, 4}     # the integers themselves
    lat = zoom_latent.lines[0].get_ydata()
    assert list(lat) == pytest.approx(trace["latent"][-80:])
    assert max(lat) - min(lat) < 0.01                      # its own axis: the sub-step latent motion is visible
    assert zoom_latent.get_ylim()[1] - zoom_latent.get_ylim()[0] < 0.01
