"""The HTML reports in a real headless browser (Debian chromium): no console messages, every
figure decodes, the screenshot is not blank. A control page with planted faults shows that
each check can fail."""

import os

import pytest

from browser import CHROMIUM, console_lines, n_colours, probe

if CHROMIUM is None:
    if os.environ.get("MODLENS_REQUIRE_BROWSER"):
        raise RuntimeError("MODLENS_REQUIRE_BROWSER is set but no chromium is installed (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); browser tests skipped", allow_module_level=True)


def test_checks_catch_planted_faults(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><title>t</title></head><body><p>x</p>'
                   '<img alt="corrupt" src="data:image/png;base64,AAAA"><img alt="missing" src="nowhere.png">'
                   '<script>console.error("planted")</script></body></html>')
    assert console_lines(bad, tmp_path, tmp_path / "bad.png"), "a console.error must be seen in chromium's log"
    seen = probe(bad, tmp_path)
    assert seen["n_images"] == 2 and sorted(seen["broken"]) == ["corrupt", "missing"]
    assert any("planted" in e for e in seen["errors"])
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><head><title>b</title></head><body></body></html>")
    console_lines(blank, tmp_path, tmp_path / "blank.png")
    assert n_colours(tmp_path / "blank.png") == 1


def _check(report, tmp_path):
    n_img = report.read_text().count("<img ")
    assert n_img > 0
    shot = tmp_path / f"{report.stem}.png"
    assert console_lines(report, tmp_path, shot) == []
    seen = probe(report, tmp_path)
    assert seen == {"n_images": n_img, "broken": [], "errors": []}
    assert n_colours(shot) > 16, "the screenshot is blank"
    return n_img


def test_study_report_in_browser(tiny_study, tmp_path):
    from modlens.report.outputs import write_study_outputs

    out = write_study_outputs(tiny_study)
    n_img = _check(out["report"], tmp_path)
    assert n_img == len([p for p in out["figures"] if p.suffix == ".png"])


def test_single_result_report_in_browser(tiny_study, tmp_path):
    from modlens.report.outputs import write_result_report

    report = write_result_report(tiny_study / "networks" / "mlp-digits-s2", tmp_path / "single.html")
    _check(report, tmp_path)


def test_notebook_displays_in_browser(tiny_study, tmp_path):
    """What a notebook shows for a study, a result and a partition (their _repr_html_), on one page:
    no console messages, every figure decodes, the tables are marked as in the report."""
    from modlens.analysis.result import load_result
    from modlens.report.outputs import write_study_outputs
    from modlens.study.results import open_study

    out = write_study_outputs(tiny_study)
    study = open_study(tiny_study)
    result = load_result(tiny_study / "networks" / "mlp-digits-s2")
    part = result.partitions["weights/global"]
    pieces = {"study": study._repr_html_(), "result": result._repr_html_(), "partition": part._repr_html_()}
    assert pieces["study"].count("<img ") == len([p for p in out["figures"] if p.suffix == ".png"])
    assert pieces["result"].count("<img ") >= 1  # the percentile histograms, and the grids where saved
    assert "Table 4: lesion experiments" in pieces["study"] and "Table 1: effect measures" in pieces["study"]
    assert "n-cut per partitioning" in pieces["study"] and "weights/global" in pieces["partition"]
    assert f"{part.ncut:.4f}" in pieces["partition"]
    page = tmp_path / "notebook.html"
    page.write_text('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
                    "<title>notebook</title></head><body>" + "".join(pieces.values()) + "</body></html>",
                    encoding="utf-8")
    _check(page, tmp_path)
