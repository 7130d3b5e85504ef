"""Validation sessions for models with external data: weights fed from maps of their files."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import ort_run
from onnxopt.model_io import load_model
from onnxopt.passes.quantize import QuantizeWeightsPass
from test_bigmodel import peak_growth_of_optimize, write_external_model


def test_external_weights_are_fed_from_the_data_file_not_copied(tmp_path):
    source = write_external_model(tmp_path / "in", d=64, layers=2)
    model = load_model(source)
    session = ort_run.make_session(model)
    assert isinstance(session, ort_run.FedWeightsSession)
    assert [i.name for i in session.get_inputs()] == [v.name for v in model.graph.inputs]
    data = np.memmap(source.parent / "model.onnx.data", dtype=np.uint8, mode="r")
    for name, array in session._weights.items():
        assert not array.flags.writeable and not array.flags.owndata, name
        assert np.array_equal(array, model.graph.initializers[name].const_value.numpy()), name
    assert len(session._weights) == len(model.graph.initializers)
    x = {model.graph.inputs[0].name: np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}
    fed = ort_run.run(session, x)
    from_file = ort_run.run(ort_run.make_session(source), x)
    for name in from_file:
        np.testing.assert_allclose(fed[name], from_file[name], rtol=1e-5, atol=1e-6)
    assert ort_run.run(session, x).keys() == fed.keys()  # runs again after its pages were dropped
    del data


def test_the_model_is_unchanged_after_a_fed_session_and_lazy_weights_are_written(tmp_path):
    source = write_external_model(tmp_path / "in", d=64, layers=2)
    model = load_model(source)
    QuantizeWeightsPass(bits=4, granularity="blocked")(model)
    before = ([v.name for v in model.graph.inputs], list(model.graph.initializers))
    session = ort_run.make_session(model)
    assert isinstance(session, ort_run.FedWeightsSession)
    assert ([v.name for v in model.graph.inputs], list(model.graph.initializers)) == before
    assert all(model.graph.initializers[name].const_value is not None for name in before[1])
    quantized = {n for n, v in model.graph.initializers.items() if isinstance(v.const_value, ir.LazyTensor)}
    assert quantized and not quantized & session._weights.keys()  # computed weights go to ORT, not fed


def test_optimized_sessions_and_inline_models_are_plain_sessions(tmp_path):
    source = write_external_model(tmp_path / "in", d=32, layers=1)
    assert not isinstance(ort_run.make_session(load_model(source), optimized=True), ort_run.FedWeightsSession)
    inline = ir.external_data.load_to_model(load_model(source))
    assert not isinstance(ort_run.make_session(inline), ort_run.FedWeightsSession)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for the peak RSS")
def test_validated_quantization_of_a_200mb_model_stays_near_the_model_size(tmp_path):
    """The reference run reads every weight once (about 1x); candidates and the per-tensor SQNR
    must not add copies (1.17-1.26x here; before weights were fed from maps: 1.44x)."""
    source = write_external_model(tmp_path / "in", d=1024, layers=12)
    model_bytes = (source.parent / "model.onnx.data").stat().st_size
    out = tmp_path / "out" / "q.onnx"
    growth = peak_growth_of_optimize(source, out, "quantize-weights:bits=8", validate="each")
    assert growth < 1.35 * model_bytes, f"peak grew by {growth / 1e6:.0f} MB for a {model_bytes / 1e6:.0f} MB model"
