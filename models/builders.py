"""Deterministic toy models that exercise common graph shapes.

Each builder writes the graph structure as ONNX text, attaches seeded weights (the MLP's trained on a small synthetic task, :func:`mlp_task`)
as initializers and returns a checked ``onnx.ModelProto`` (IR 8, opset 17).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper, parser

HEADER = '<ir_version: 8, opset_import: ["" : 17], producer_name: "onnxopt.models">'


def _he_normal(rng: np.random.Generator, fan_in: int, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _small(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.05).astype(np.float32)


def _model(graph_text: str, initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Parse ``graph_text``, append ``initializers`` in order and run the full checker."""
    model = parser.parse_model(HEADER + "\n" + graph_text)
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in initializers.items())
    onnx.checker.check_model(model, full_check=True)
    return model


MLP_SIZES = (100, 64, 32, 10)


def mlp_task(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` samples of the MLP's synthetic task: (x float32 [count, 100], labels int64 [count]).

    Ten classes of three prototypes each (fixed, seed 1234) in 100 dimensions; a sample is a
    prototype scaled by 0.5 plus unit Gaussian noise, so the classes overlap and are not
    linearly separable (the trained MLP scores about 94% on held-out samples).
    """
    prototypes = np.random.default_rng(1234).standard_normal((30, MLP_SIZES[0]))
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(prototypes), count)
    x = 0.5 * prototypes[which] + rng.standard_normal((count, MLP_SIZES[0]))
    return x.astype(np.float32), (which % MLP_SIZES[-1]).astype(np.int64)


@functools.lru_cache(maxsize=4)
def _trained_mlp(seed: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """He-initialized weights trained by minibatch SGD (momentum 0.9, lr 0.05, L2 1e-4, batches of 100,
    15 epochs over 8000 samples of ``mlp_task(seed=seed + 1)``) in float64; about a second."""
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in) for n_in, n_out in zip(MLP_SIZES, MLP_SIZES[1:])]
    biases = [np.zeros(n_out) for n_out in MLP_SIZES[1:]]
    x, labels = mlp_task(8000, seed + 1)
    x = x.astype(np.float64)
    velocity = [np.zeros_like(a) for a in weights + biases]
    for _ in range(15):
        order = rng.permutation(len(x))
        for start in range(0, len(x), 100):
            batch = order[start:start + 100]
            acts = [x[batch]]
            for i, (w, b) in enumerate(zip(weights, biases)):
                z = acts[-1] @ w + b
                acts.append(np.maximum(z, 0) if i < len(weights) - 1 else z)
            logits = acts[-1] - acts[-1].max(axis=1, keepdims=True)
            grad = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            grad[np.arange(len(batch)), labels[batch]] -= 1
            grad /= len(batch)
            for i in reversed(range(len(weights))):
                grad_w, grad_b = acts[i].T @ grad + 1e-4 * weights[i], grad.sum(axis=0)
                if i:
                    grad = (grad @ weights[i].T) * (acts[i] > 0)
                for j, (param, g) in enumerate(((weights[i], grad_w), (biases[i], grad_b))):
                    v = velocity[i + j * len(weights)]
                    v *= 0.9
                    v -= 0.05 * g
                    param += v
    return tuple(w.astype(np.float32) for w in weights), tuple(b.astype(np.float32) for b in biases)


def build_mlp(seed: int = 0, trained: bool = True) -> onnx.ModelProto:
    """Dense MLP 100 -> 64 -> 32 -> 10 with ReLU and a Softmax head, trained on :func:`mlp_task`
    (``trained=False``: the seeded random He-normal weights and small biases it had before)."""
    weights: dict[str, np.ndarray] = {}
    if trained:
        for i, (w, b) in enumerate(zip(*_trained_mlp(seed)), start=1):
            weights[f"fc{i}_weight"], weights[f"fc{i}_bias"] = w.copy(), b.copy()
    else:
        rng = np.random.default_rng(seed)
        for i, (n_in, n_out) in enumerate(zip(MLP_SIZES, MLP_SIZES[1:]), start=1):
            weights[f"fc{i}_weight"] = _he_normal(rng, n_in, (n_in, n_out))
            weights[f"fc{i}_bias"] = _small(rng, n_out)
    return _model("""
    mlp (float[batch,100] x) => (float[batch,10] probs) {
        h1_mm = MatMul(x, fc1_weight)
        h1_pre = Add(h1_mm, fc1_bias)
        h1 = Relu(h1_pre)
        h2_mm = MatMul(h1, fc2_weight)
        h2_pre = Add(h2_mm, fc2_bias)
        h2 = Relu(h2_pre)
        out_mm = MatMul(h2, fc3_weight)
        logits = Add(out_mm, fc3_bias)
        probs = Softmax<axis = -1>(logits)
    }""", weights)


def _conv(rng: np.random.Generator, name: str, c_in: int, c_out: int, k: int) -> dict[str, np.ndarray]:
    return {f"{name}_weight": _he_normal(rng, c_in * k * k, (c_out, c_in, k, k)),
            f"{name}_bias": _small(rng, c_out)}


def build_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv+BN+ReLU stem, a residual block, two Concat-joined branches, pooling, Gemm head."""
    rng = np.random.default_rng(seed)
    w = {"stem_weight": _he_normal(rng, 27, (16, 3, 3, 3)),
         "bn_scale": (1.0 + 0.1 * rng.standard_normal(16)).astype(np.float32),
         "bn_bias": _small(rng, 16),
         "bn_mean": (0.1 * rng.standard_normal(16)).astype(np.float32),
         "bn_var": rng.uniform(0.5, 1.5, 16).astype(np.float32)}
    w |= _conv(rng, "res1", 16, 16, 3) | _conv(rng, "res2", 16, 16, 3)
    w |= _conv(rng, "branch_a", 16, 8, 1) | _conv(rng, "branch_b", 16, 8, 3)
    w |= {"fc_weight": _he_normal(rng, 16, (10, 16)), "fc_bias": _small(rng, 10)}
    return _model("""
    cnn (float[batch,3,32,32] image) => (float[batch,10] logits) {
        stem = Conv<kernel_shape = [3,3], pads = [1,1,1,1]>(image, stem_weight)
        stem_bn = BatchNormalization<epsilon = 1e-5>(stem, bn_scale, bn_bias, bn_mean, bn_var)
        a = Relu(stem_bn)
        r1 = Conv<kernel_shape = [3,3], pads = [1,1,1,1]>(a, res1_weight, res1_bias)
        r1_act = Relu(r1)
        r2 = Conv<kernel_shape = [3,3], pads = [1,1,1,1]>(r1_act, res2_weight, res2_bias)
        res_sum = Add(r2, a)
        res = Relu(res_sum)
        pooled = MaxPool<kernel_shape = [2,2], strides = [2,2]>(res)
        ba = Conv<kernel_shape = [1,1]>(pooled, branch_a_weight, branch_a_bias)
        ba_act = Relu(ba)
        bb = Conv<kernel_shape = [3,3], pads = [1,1,1,1]>(pooled, branch_b_weight, branch_b_bias)
        bb_act = Relu(bb)
        joined = Concat<axis = 1>(ba_act, bb_act)
        gap = GlobalAveragePool(joined)
        flat = Flatten<axis = 1>(gap)
        logits = Gemm<transB = 1>(flat, fc_weight, fc_bias)
    }""", w)


def build_control_flow(seed: int = 0) -> onnx.ModelProto:
    """If and Loop bodies that capture outer-scope weights; bodies hold an Identity and duplicate constants."""
    rng = np.random.default_rng(seed)
    w = {"proj_weight": _he_normal(rng, 8, (8, 8)),
         "step_weight": (_he_normal(rng, 8, (8, 8)) * 0.5).astype(np.float32),
         "step_bias": _small(rng, 8),
         "trip_count": np.array(3, dtype=np.int64),
         "keep_going": np.array(True)}
    return _model("""
    control_flow (float[batch,8] x, bool flag) => (float[batch,8] y) {
        branch_out = If(flag) <
            then_branch = relu_branch () => (float[batch,8] then_out) {
                t_mm = MatMul(x, proj_weight)
                t_copy = Identity(t_mm)
                then_out = Relu(t_copy)
            },
            else_branch = affine_branch () => (float[batch,8] else_out) {
                e_mm = MatMul(x, proj_weight)
                half_a = Constant<value_float = 0.5>()
                half_b = Constant<value_float = 0.5>()
                e_scaled = Mul(e_mm, half_a)
                else_out = Add(e_scaled, half_b)
            }>
        loop_state = Loop(trip_count, keep_going, branch_out) <
            body = step_body (int64 i, bool cond_in, float[batch,8] state) => (bool cond_out, float[batch,8] state_out) {
                cond_out = Identity(cond_in)
                s_mm = MatMul(state, step_weight)
                s_pre = Add(s_mm, step_bias)
                s_act = Tanh(s_pre)
                state_out = Add(state, s_act)
            }>
        y = Add(loop_state, x)
    }""", w)


def build_transformer(seed: int = 0) -> onnx.ModelProto:
    """Pre-norm transformer block: width 32, 2 heads of 16, erf-GELU MLP of width 64."""
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}
    for ln in ("ln1", "ln2"):
        w[f"{ln}_scale"] = (1.0 + 0.1 * rng.standard_normal(32)).astype(np.float32)
        w[f"{ln}_bias"] = _small(rng, 32)
    for name, n_in, n_out in (("q", 32, 32), ("k", 32, 32), ("v", 32, 32), ("o", 32, 32),
                              ("fc1", 32, 64), ("fc2", 64, 32)):
        w[f"{name}_weight"] = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        w[f"{name}_bias"] = _small(rng, n_out)
    w |= {"heads_shape": np.array([0, 0, 2, 16], dtype=np.int64),
          "merged_shape": np.array([0, 0, 32], dtype=np.int64),
          "attn_scale": np.array(0.25, dtype=np.float32),
          "inv_sqrt2": np.array(1 / np.sqrt(2), dtype=np.float32),
          "one": np.array(1.0, dtype=np.float32), "half": np.array(0.5, dtype=np.float32)}
    return _model("""
    transformer (float[batch,seq,32] tokens) => (float[batch,seq,32] hidden) {
        ln1 = LayerNormalization<axis = -1, epsilon = 1e-5>(tokens, ln1_scale, ln1_bias)
        q_mm = MatMul(ln1, q_weight)
        q = Add(q_mm, q_bias)
        k_mm = MatMul(ln1, k_weight)
        k = Add(k_mm, k_bias)
        v_mm = MatMul(ln1, v_weight)
        v = Add(v_mm, v_bias)
        q_heads = Reshape(q, heads_shape)
        k_heads = Reshape(k, heads_shape)
        v_heads = Reshape(v, heads_shape)
        q_t = Transpose<perm = [0,2,1,3]>(q_heads)
        k_t = Transpose<perm = [0,2,3,1]>(k_heads)
        v_t = Transpose<perm = [0,2,1,3]>(v_heads)
        scores = MatMul(q_t, k_t)
        scaled = Mul(scores, attn_scale)
        attn = Softmax<axis = -1>(scaled)
        ctx = MatMul(attn, v_t)
        ctx_t = Transpose<perm = [0,2,1,3]>(ctx)
        ctx_merged = Reshape(ctx_t, merged_shape)
        o_mm = MatMul(ctx_merged, o_weight)
        attn_out = Add(o_mm, o_bias)
        h1 = Add(tokens, attn_out)
        ln2 = LayerNormalization<axis = -1, epsilon = 1e-5>(h1, ln2_scale, ln2_bias)
        f1_mm = MatMul(ln2, fc1_weight)
        f1 = Add(f1_mm, fc1_bias)
        g_div = Mul(f1, inv_sqrt2)
        g_erf = Erf(g_div)
        g_plus = Add(g_erf, one)
        g_half = Mul(f1, half)
        gelu = Mul(g_half, g_plus)
        f2_mm = MatMul(gelu, fc2_weight)
        mlp_out = Add(f2_mm, fc2_bias)
        hidden = Add(h1, mlp_out)
    }""", w)


BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "control_flow": build_control_flow,
    "transformer": build_transformer,
}


def write_all(outdir: str | Path) -> list[Path]:
    """Write every builder's model to ``outdir/<name>.onnx`` and return the paths in BUILDERS order."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in BUILDERS.items():
        path = outdir / f"{name}.onnx"
        onnx.save_model(build(), path)
        paths.append(path)
    return paths
