"""HTML pages for optimize, diff and split: escaped, self-contained, and rendered in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess

import onnx
import pytest

from onnxopt import api
from onnxopt.cli import main
from onnxopt.html_report import render_diff_page
from onnxopt.models import builders
from test_diff import _pair

HOSTILE = '<script>alert("x")</script>&'


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _render(path) -> tuple[str, str]:
    """The DOM after scripts ran, and the browser's log (console messages appear as CONSOLE lines)."""
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser: install Debian's chromium (apt-get install -y chromium) to render the page")
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=2000", "--dump-dom",
                           path.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and not proc.stdout.strip():
        pytest.skip(f"{browser} does not start here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def _assert_clean(dom: str, log: str, charts: int) -> None:
    assert 'data-ready="1"' in dom, "the page's script did not finish"
    assert not re.search(r'<html[^>]*data-errors=', dom), re.search(r'<html[^>]*>', dom).group(0)
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not console, console
    found = int(re.search(r'data-charts="(\d+)"', dom).group(1))
    assert found >= charts and dom.count('<svg class="chart"') == found
    assert "http://" not in dom.replace("http://www.w3.org/2000/svg", "") and "https://" not in dom


def _perturbed_pair(tmp_path, hostile_name: bool = False):
    return _pair(tmp_path, HOSTILE if hostile_name else None)


def test_model_strings_are_escaped(tmp_path):
    a, b = _perturbed_pair(tmp_path, hostile_name=True)
    text = render_diff_page(api.diff(a, b, tensors=True))
    assert HOSTILE not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in text
    assert text.count("<script>") == 1  # the page's own


def test_diff_page_renders_in_a_browser(tmp_path, capsys):
    a, b = _perturbed_pair(tmp_path, hostile_name=True)
    page = tmp_path / "diff.html"
    assert main(["diff", str(a), str(b), "--tensors", "--html", str(page)]) == 0
    dom, log = _render(page)
    _assert_clean(dom, log, charts=2)
    assert 'id="tensor-snr"' in dom and 'id="first-divergence"' in dom and "First divergence" in dom
    assert '<circle class="point' in dom and 'class="highlight"' in dom
    assert "<script>alert" not in dom


def test_optimize_page_renders_with_fallback_trials(tmp_path):
    source = tmp_path / "mlp.onnx"
    onnx.save(builders.build_mlp(), source)
    page = tmp_path / "optimize.html"
    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "-p", "cleanup",
                 "-p", "quantize-weights:bits=2", "--budget", "cosine=0.995", "--quiet", "--html", str(page)])
    assert code in (0, 1)
    text = page.read_text()
    assert "Fallback trials" in text  # 2-bit weights break the budget: mixed precision runs trials
    dom, log = _render(page)
    _assert_clean(dom, log, charts=6)
    for chart in ("size-chart", "nodes-chart", "latency-chart", "time-chart", "fidelity-chart", "tensor-snr"):
        assert f'id="{chart}"' in dom, chart
    assert '<rect class="bar"' in dom and 'id="pass-table"' in dom


def _split_result() -> dict:
    """A split result in the shape `split` exposes (SplitResult.as_dict()), built by hand."""
    stages = [{"index": i, "file": f"stage{i}.onnx", "partition": HOSTILE if i == 1 else None,
               "inputs": ["image"] if i == 0 else [f"t{i - 1}"], "outputs": [f"t{i}"] if i < 2 else ["logits"],
               "nodes": 5 + i, "params": 1000 * (i + 1), "weight_bytes": 4000 * (i + 1), "ops": {"Conv": 1},
               "cost": 1000.0 * (i + 1)} for i in range(3)]
    return {"ok": True, "outdir": "out", "pass": "split-stages:stages=3,by=params",
            "pass_stats": {"by": "params"}, "balance": {"by": "params", "stage_costs": [1000.0, 2000.0, 3000.0],
                                                        "total_cost": 6000.0, "ideal_cost": 2000.0,
                                                        "max_over_ideal": 1.5},
            "stages": stages,
            "tensors": [{"name": "image", "from": None, "to": [0], "model_input": True, "model_output": False},
                        {"name": "t0", "from": 0, "to": [1], "model_input": False, "model_output": False},
                        {"name": "t1", "from": 1, "to": [2], "model_input": False, "model_output": False},
                        {"name": "logits", "from": 2, "to": [], "model_input": False, "model_output": True}],
            "stitch": {"equal": True, "against": "original",
                       "metrics": {"logits": {"max_abs": 0.0, "cosine": 1.0, "snr_db": "inf"}}},
            "seconds": {"split": 0.1, "export": 0.2, "stitch": 0.3}}


def test_split_page_renders_stage_costs(tmp_path):
    from onnxopt.html_report import render_split_page, write_page

    page = write_page(render_split_page(_split_result()), tmp_path / "split.html")
    text = page.read_text()
    assert HOSTILE not in text and "largest / ideal = 1.500" in text
    dom, log = _render(page)
    _assert_clean(dom, log, charts=3)
    assert 'id="stage-cost-chart"' in dom and dom.count('<rect class="bar"') == 9
    assert 'class="highlight reference"' in dom  # the ideal cost level
    assert "stitch-back exact" in dom and 'id="stage-table"' in dom


def test_split_command_writes_its_page(tmp_path):
    source = tmp_path / "cnn.onnx"
    onnx.save(builders.build_cnn(), source)
    page = tmp_path / "split.html"
    assert main(["split", str(source), "-o", str(tmp_path / "stages"), "--stages", "3", "--by", "flops",
                 "--html", str(page)]) == 0
    dom, log = _render(page)
    _assert_clean(dom, log, charts=3)
    assert 'id="stage-cost-chart"' in dom and "stage cost by flops" in dom and dom.count('<rect class="bar"') == 9
