"""Opset upgrades keep external data reachable."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt import api


def test_upgrading_an_external_data_model_finds_its_weights_from_another_cwd(tmp_path, monkeypatch):
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", 1, [2, 128])],
                              [helper.make_tensor_value_info("y", 1, [2, 64])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    source = tmp_path / "in" / "m.onnx"
    source.parent.mkdir()
    onnx.save(model, source, save_as_external_data=True, location="m.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)
    result = api.optimize(source, tmp_path / "out" / "q.onnx",
                          ["quantize-weights:bits=4,granularity=blocked,min_elements=16"], budget="cosine=0.9")
    step = result.report["passes"][0]
    assert result.ok, step["reason"]
    assert step["stats"]["opset_upgraded"] == "17->21"
    assert os.path.exists(tmp_path / "out" / "q.onnx")
