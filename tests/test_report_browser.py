"""The search's report.html, rendered by a real headless Chromium (DevTools protocol over a pipe)."""

from __future__ import annotations

import json

import pytest

from ._services import Browser, chromium_path, small_search

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed: apt-get install chromium")

PAGE_FACTS = """JSON.stringify({
  images: [...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight, src: i.src.slice(0, 22)})),
  svgs: document.querySelectorAll('svg').length,
  tables: [...document.querySelectorAll('table')].map(t => t.rows.length),
  headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
  links: [...document.querySelectorAll('link[href], script[src]')].length,
  text: document.body.innerText,
})"""


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


@pytest.fixture(scope="module")
def searches(tmp_path_factory):
    return tmp_path_factory.mktemp("report-searches")


def _render(browser, page):
    browser.open(page.as_uri())
    facts = json.loads(browser.evaluate(PAGE_FACTS))
    assert browser.errors() == [], browser.errors()  # no console error, exception or failed load
    foreign = [u for u in browser.requests() if not u.startswith(("file://", "data:"))]
    assert foreign == []  # self-contained: nothing fetched from anywhere
    assert facts["links"] == 0
    return facts


def test_report_shows_plots_and_tables(browser, searches, trained):
    out, err = small_search(searches, trained("lenet5")[1], methods=["finetune", "test_fail"], trials=3)
    assert err is None
    result = json.loads((out / "result.json").read_text())
    facts = _render(browser, out / "report.html")
    plots = [i for i in facts["images"] if i["src"].startswith("data:image/png")]
    assert len(plots) >= 4 and all(i["w"] > 300 and i["h"] > 150 for i in plots)  # decoded, real pictures
    assert {"Pareto plot: speed-up against validation accuracy", "per-layer time share"} <= {i["alt"] for i in plots}
    # tables: baseline vs best, Pareto trials, per-layer profile, every trial (header + one row per trial)
    assert len(facts["tables"]) == 4 and facts["tables"][-1] == 1 + 3
    assert any(h.startswith("Baseline vs best") for h in facts["headings"])
    assert "Per-layer profile of the best model" in " ".join(facts["headings"])
    text = facts["text"]
    assert f"{result['baseline']['accuracy']:.4f}" in text and f"{result['result']['accuracy']:.4f}" in text
    assert "on purpose" in text  # the failed trial's reason is shown
    assert "conv1" in text and "fc2" in text  # layers of the best model


def test_report_of_an_infeasible_search(browser, searches, trained):
    out, err = small_search(searches, trained("lenet5")[1], trials=2, max_size_kb=1.0)
    assert err is not None
    facts = _render(browser, out / "report.html")
    assert "No trial met the budget" in facts["text"] and "size_kb" in facts["text"]
    assert "Closest trials" in facts["headings"]
    assert len([i for i in facts["images"] if i["w"] > 300]) >= 2  # the Pareto plots still show every trial
