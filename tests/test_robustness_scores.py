"""Robustness result tables and scores (CE, mCE, relative mCE) with hand-computable numbers; suite specs."""
import math

import pytest

from lightning_app.robustness.results import (
    Result,
    comparison,
    comparison_markdown,
    corruption_error,
    mce,
    read_csv,
    relative_corruption_error,
    relative_mce,
    summary,
    to_markdown,
    with_model,
    write_csv,
)
from lightning_app.robustness.specs import build_suite, parse_attack, parse_number, resolve_corruptions


def table(clean_err, errs, model=""):
    """Rows from {corruption: (err_s1, err_s2, ...)} and a clean error."""
    rows = [Result("clean", "clean", 0, 1 - clean_err, n=10, model=model)]
    for c, es in errs.items():
        rows += [Result(c, "corruption", s, 1 - e, n=10, model=model) for s, e in enumerate(es, start=1)]
    return rows


# model:    clean .1; gaussian_noise .2 .4; defocus_blur .1 .3
# baseline: clean .2; gaussian_noise .4 .6; defocus_blur .3 .5
MODEL = table(0.1, {"gaussian_noise": (0.2, 0.4), "defocus_blur": (0.1, 0.3)})
BASE = table(0.2, {"gaussian_noise": (0.4, 0.6), "defocus_blur": (0.3, 0.5)})


def test_ce_and_mce_by_hand():
    ce = corruption_error(MODEL, BASE)
    assert ce["gaussian_noise"] == pytest.approx(0.6 / 1.0)  # (.2 + .4) / (.4 + .6)
    assert ce["defocus_blur"] == pytest.approx(0.4 / 0.8)  # (.1 + .3) / (.3 + .5)
    assert mce(MODEL, BASE) == pytest.approx((0.6 + 0.5) / 2)


def test_relative_ce_and_mce_by_hand():
    rel = relative_corruption_error(MODEL, BASE)
    assert rel["gaussian_noise"] == pytest.approx((0.1 + 0.3) / (0.2 + 0.4))
    assert rel["defocus_blur"] == pytest.approx((0.0 + 0.2) / (0.1 + 0.3))
    assert relative_mce(MODEL, BASE) == pytest.approx((2 / 3 + 0.5) / 2)


def test_baseline_against_itself_is_100_percent():
    assert all(v == pytest.approx(1.0) for v in corruption_error(BASE, BASE).values())
    assert mce(BASE, BASE) == pytest.approx(1.0)
    assert relative_mce(BASE, BASE) == pytest.approx(1.0)


def test_extras_reported_but_not_in_mce():
    m = MODEL + table(0.1, {"speckle_noise": (0.5,)})[1:]
    b = BASE + table(0.2, {"speckle_noise": (0.25,)})[1:]
    assert corruption_error(m, b)["speckle_noise"] == pytest.approx(2.0)
    assert mce(m, b) == pytest.approx(0.55)  # the benchmark corruptions only, as ImageNet-C


def test_undefined_ratio_is_nan():
    perfect = table(0.0, {"gaussian_noise": (0.0, 0.0), "defocus_blur": (0.3, 0.5)})
    ce = corruption_error(MODEL, perfect)
    assert math.isnan(ce["gaussian_noise"]) and ce["defocus_blur"] == pytest.approx(0.5)
    assert math.isnan(mce(MODEL, perfect))


def test_mismatched_suites_raise():
    with pytest.raises(ValueError, match="severities"):
        corruption_error(MODEL, table(0.2, {"gaussian_noise": (0.4,), "defocus_blur": (0.3, 0.5)}))
    with pytest.raises(ValueError, match="no results for corruption 'defocus_blur'"):
        corruption_error(MODEL, table(0.2, {"gaussian_noise": (0.4, 0.6)}))
    with pytest.raises(ValueError, match="clean"):
        relative_mce(MODEL[1:], BASE)


def test_csv_round_trip_and_markdown(tmp_path):
    rows = with_model(MODEL + [Result("snow", "corruption", 1, 0.5, 0.9, 10, exact=False),
                               Result("pgd", "attack", 0, 0.05, 0.3, 10, params="eps=8/255")], "m")
    path = write_csv(rows, tmp_path / "r.csv")
    back = read_csv(path)
    assert back == rows
    md = to_markdown(rows)
    assert "| snow ≈ | 1 | 50.00 | 90.00 | 50.00 | 10 |" in md and "approximation" in md
    assert "| pgd |  | 5.00 | 30.00 | 95.00 | 10 | eps=8/255 |" in md
    write_csv(rows + with_model(BASE, "b"), tmp_path / "two.csv")
    with pytest.raises(ValueError, match="several models"):
        read_csv(tmp_path / "two.csv")
    assert read_csv(tmp_path / "two.csv", model="b") == with_model(BASE, "b")


def test_comparison_has_every_model_and_baseline_at_100():
    tables = {"m": MODEL, "b": BASE}
    header, rows = comparison(tables, baseline="b")
    assert [r[0] for r in rows] == ["m", "b"]
    col = {h: i for i, h in enumerate(header)}
    assert rows[1][col["mCE"]] == pytest.approx(1.0) and rows[1][col["CE_gaussian_noise"]] == pytest.approx(1.0)
    assert rows[0][col["mCE"]] == pytest.approx(0.55)
    assert rows[0][col["relative_mCE"]] == pytest.approx(7 / 12)
    assert rows[0][col["clean_top1"]] == pytest.approx(0.9)
    md = comparison_markdown(header, rows, "b")
    assert "| m | 90.00 |" in md and "mCE %" in md and "relative mCE %" in md
    with pytest.raises(ValueError, match="not one of the models"):
        comparison(tables, baseline="x")
    assert "mCE" not in summary(MODEL)


# ----------------------------------------------------------------------------- specs
def test_suite_order_and_defaults():
    suite = build_suite(severities=[2, 1], attacks=[{"name": "fgsm"}])
    assert suite[0].key == "clean"
    assert [p.key for p in suite[1:3]] == ["gaussian_noise_s1", "gaussian_noise_s2"]
    assert len(suite) == 1 + 15 * 2 + 1 and suite[-1].key == "fgsm"
    assert len(resolve_corruptions("all")) == 19  # ImageNet-C: 15 + speckle_noise, gaussian_blur, spatter, saturate
    assert [p.exact for p in build_suite(["snow", "fog"], [1])[1:]] == [False, True]


def test_unknown_names_and_bad_values_explain():
    with pytest.raises(ValueError, match="unknown corruption 'gausian_noise'.*gaussian_noise"):
        build_suite(["gausian_noise"])
    with pytest.raises(ValueError, match="severities must be ints in 1..5"):
        build_suite(severities=[0])
    with pytest.raises(ValueError, match="unknown attack 'cw'; known: fgsm, pgd"):
        parse_attack({"name": "cw"})
    with pytest.raises(ValueError, match="has no parameter 'steps'"):
        parse_attack({"name": "fgsm", "steps": 3})
    with pytest.raises(ValueError, match="give repeated attacks a 'label'"):
        build_suite([], attacks=[{"name": "pgd"}, {"name": "pgd", "steps": 20}])
    two = build_suite([], attacks=[{"name": "pgd"}, {"name": "pgd", "steps": 20, "label": "pgd20"}])
    assert [p.key for p in two] == ["clean", "pgd", "pgd20"]


def test_attack_parameters_accept_fractions():
    p = parse_attack({"name": "pgd", "eps": "8/255", "alpha": 0.5 / 255, "steps": 3})
    assert p.kwargs == {"eps": 8 / 255, "alpha": 0.5 / 255, "steps": 3, "random_start": True}
    assert p.describe_params() == "eps=8/255 alpha=0.00196078 steps=3 random_start=True"
    assert parse_number("4 / 255", "eps") == 4 / 255
    with pytest.raises(ValueError, match="fraction like '8/255'"):
        parse_attack({"name": "fgsm", "eps": "eight"})


# ----------------------------------------------------------------------------- charts
def _fig_axes(monkeypatch, fn, *args):
    from lightning_app.robustness import plots

    seen = {}
    real = plots.save_figure

    def spy(fig, path, **kw):
        seen["fig"] = fig
        return real(fig, path, **kw)

    monkeypatch.setattr(plots, "save_figure", spy)
    assert fn(*args).read_bytes()[:4] == b"\x89PNG"
    return [ax for ax in seen["fig"].axes if ax.get_visible()]


def _rows(model, clean):
    from lightning_app.perturb import CORRUPTIONS

    rows = [Result("clean", "clean", 0, clean, model=model)]
    rows += [Result(n, "corruption", s, clean - 0.1 * s, exact=c.exact, model=model)
             for n, c in CORRUPTIONS.items() for s in (1, 3, 5)]
    return rows + [Result("fgsm", "attack", 0, 0.2, model=model)]


def test_chart_has_a_panel_per_category_with_clean_marked(tmp_path, monkeypatch):
    from lightning_app.robustness.plots import plot_accuracy_vs_severity

    axes = _fig_axes(monkeypatch, plot_accuracy_vs_severity, _rows("m", 0.9), tmp_path / "r.png")
    assert [ax.get_title() for ax in axes] == ["noise", "blur", "weather", "digital", "all corruptions and attacks"]
    for ax in axes:
        clean = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert [ln.get_ydata()[0] for ln in clean] == [0.9] and "clean 90.0%" in [t.get_text() for t in ax.get_legend().texts]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["clean", "1", "2", "3", "4", "5"]
    weather = [t.get_text() for t in axes[2].get_legend().texts]
    assert {"fog", "brightness", "spatter"} <= set(weather) and "snow ≈" in weather
    assert "fgsm 20.0%" in [t.get_text() for t in axes[4].get_legend().texts]


def test_comparison_chart_has_category_panels(tmp_path, monkeypatch):
    from lightning_app.robustness.plots import plot_comparison

    axes = _fig_axes(monkeypatch, plot_comparison, {"a": _rows("a", 0.9), "b": _rows("b", 0.8)}, tmp_path / "c.png")
    assert [ax.get_title().split(" ")[0] for ax in axes] == ["noise", "blur", "weather", "digital", "clean,"]
    for ax in axes[:4]:
        assert sorted(ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--") == [0.8, 0.9]
