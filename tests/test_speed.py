"""Speed in the budget: the runner's speed check and placement search, with fake latencies,
and one real ORT measurement that only checks the ratio is reported."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from onnxopt import api, target
from onnxopt.errors import UsageError
from onnxopt.metrics import Budget
from onnxopt.runner import RunConfig, Runner
from onnxopt.spec import parse_pipeline

# x feeds two MatMuls (one island: they share x's Q/DQ); a third MatMul alone between float ops.
TWO_ISLANDS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,96] x) => (float[N,96] y) {
    a = MatMul(x, wa)
    b = MatMul(x, wb)
    s = Add(a, b)
    t = Tanh(s)
    y = MatMul(t, wc)
}"""


def model() -> ir.Model:
    proto = onnx.parser.parse_model(TWO_ISLANDS)
    rng = np.random.default_rng(0)
    for name in ("wa", "wb", "wc"):
        proto.graph.initializer.append(numpy_helper.from_array(
            (rng.standard_normal((96, 96)) / 10).astype(np.float32), name))
    return ir.from_proto(proto)


def feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((2, 96)).astype(np.float32)} for _ in range(4)]


class FakeTimer:
    """Latency from the Q/DQ count: 10 ms for the float model, ``base + per_q`` ms per QuantizeLinear."""

    def __init__(self, base: float, per_q: float):
        self.base, self.per_q, self.calls = base, per_q, 0

    def latencies(self, models, feed):
        self.calls += 1
        return {name: self.ms(m) for name, m in models.items()}

    def ms(self, m: ir.Model) -> float:
        q = sum(1 for n in m.graph if n.op_type == "QuantizeLinear")
        return 10.0 if q == 0 else self.base + self.per_q * q


def run(timer, budget="cosine=0.9", pipeline="quantize-static:min_reduction=0"):
    config = RunConfig(budget=Budget.parse(budget), target=target.resolve("avx512-vnni"), speed_timer=timer)
    return Runner(parse_pipeline([pipeline]), config).run(model(), feeds())


def quantize_nodes(m: ir.Model) -> int:
    return sum(1 for n in m.graph if n.op_type == "QuantizeLinear")


def test_a_fast_enough_result_is_measured_once_and_kept():
    timer = FakeTimer(base=2.0, per_q=2.0)  # 2 Q nodes: 6 ms, 1.67x
    result = run(timer)
    speed = result.steps[0].speed
    assert result.ok and timer.calls == 1 and speed["trials"] == []
    assert speed["speedup"] == pytest.approx(10 / 6) and not speed["slower_than_reference"]
    assert quantize_nodes(result.model) == 2


def test_a_slower_result_takes_the_placement_that_drops_the_lone_quantized_op():
    timer = FakeTimer(base=5.0, per_q=4.0)  # 2 Q: 13 ms (0.77x); without the lone MatMul, 1 Q: 9 ms (1.11x)
    result = run(timer)
    step = result.steps[0]
    assert result.ok and step.status == "ok"
    assert step.speed["placement"] == "min_island=2" and step.speed["first_speedup"] == pytest.approx(10 / 13)
    assert step.speed["speedup"] == pytest.approx(10 / 9) and not step.speed["slower_than_reference"]
    assert quantize_nodes(result.model) == 1 and step.stats["fallbacks"]["island_below_min"] == 1
    assert not any("speed" in note for note in result.notes)


def test_a_missed_speedup_floor_rolls_the_pass_back_and_says_no_placement_is_faster():
    result = run(FakeTimer(base=5.0, per_q=4.0), budget="cosine=0.9,speedup=1.5")
    step = result.steps[0]
    assert not result.ok and step.status == "rolled_back"
    assert "speedup 1.11x < 1.5" in step.reason and "no placement that keeps ORT's fusions" in step.reason
    assert "min_island=2: 1.11x" in step.reason
    assert quantize_nodes(result.model) == 0  # the float model, as before the pass


def test_without_a_floor_a_slower_result_is_kept_with_a_warning_and_a_report_field():
    result = run(FakeTimer(base=20.0, per_q=0.0))  # every placement 20 ms: 0.5x
    step = result.steps[0]
    assert result.ok and step.status == "ok" and step.speed["slower_than_reference"] is True
    assert step.speed["placement"] is None and len(step.speed["trials"]) >= 1
    assert any("0.50x the speed" in note and "no placement" in note for note in result.notes)


def test_speedup_is_a_budget_key_and_not_an_output_metric():
    budget = Budget.parse("cosine=0.99,speedup=1.2")
    assert budget.value("speedup") == 1.2 and budget.value("snr_db") is None
    assert budget.breaches({"y": {"cosine": 0.995}}) == []
    with pytest.raises(UsageError, match="speedup"):
        Budget.parse("speedup_x=2")


def test_a_lossless_pass_is_not_timed():
    timer = FakeTimer(base=1.0, per_q=1.0)
    result = run(timer, pipeline="eliminate-identities")
    assert timer.calls == 0 and result.steps[0].speed is None


@pytest.mark.real_timing
def test_static_quantization_reports_the_measured_ratio(tmp_path):
    path = tmp_path / "m.onnx"
    ir.save(model(), path)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.stack([f["x"] for f in feeds()]))
    result = api.optimize(path, None, ["quantize-static:min_reduction=0"], data=data, budget="cosine=0.9",
                          target="avx2", threads=2)
    speed = result.report["passes"][0]["speed"]
    assert speed["threads"] == 2 and speed["speedup"] > 0 and speed["reference_ms"] > 0
    assert result.report["target"]["threads"] == 2


def test_validate_end_checks_a_lossy_step_on_its_own_and_times_unchecked_ones_at_the_end():
    def run_end(budget):
        config = RunConfig(validate="end", budget=Budget.parse(budget), target=target.resolve("avx512-vnni"),
                           speed_timer=FakeTimer(base=5.0, per_q=4.0))
        return Runner(parse_pipeline(["quantize-static:min_reduction=0"]), config).run(model(), feeds())

    searched = run_end("cosine=0.9,speedup=1.5")  # a budget: the step is checked, searched and rolled back
    assert searched.steps[0].status == "rolled_back" and "speedup 1.11x < 1.5" in searched.steps[0].reason
    assert searched.speed is None
    unchecked = run_end("none")  # no budget: no per-step check, the final model is timed
    assert unchecked.speed["speedup"] == pytest.approx(10 / 13) and unchecked.speed["slower_than_reference"]
    assert any("0.77x the speed of the input" in note for note in unchecked.notes)


def test_min_island_leaves_every_smaller_island_float():
    from onnxopt.pass_base import PassContext
    from onnxopt.passes.quantize.static import QuantizeStaticPass

    kept = model()
    two = QuantizeStaticPass(min_reduction=0, min_island=2, context=PassContext(feeds()))(kept)
    assert two.modified and two.stats["nodes_quantized"] == 2 and two.stats["fallbacks"]["island_below_min"] == 1
    nothing = QuantizeStaticPass(min_reduction=0, min_island=3, context=PassContext(feeds()))(model())
    assert not nothing.modified and nothing.stats["fallbacks"]["island_below_min"] == 3
