"""qseg.exporters.openvino_form: the OpenVINO-only rewrite of qseg's QDQ graph keeps
every value (onnxruntime computes the same outputs from both graphs), and with it
OpenVINO fuses every activation quantizer of the default recipe into its int8
convolutions, where its plain conversion leaves Convert / Clamp ops between them."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from onnx import TensorProto, helper
from torch import nn

import qseg
from qseg.errors import ExportError
from qseg.exporters import (
    OpenVINOForm,
    check_parity,
    compile_openvino,
    export_onnx,
    openvino_form,
    openvino_from_onnx,
    runtime_precisions,
)
from qseg.runtime import run_openvino

CODE_TYPES = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}


def scalar(name: str, value: float | int, dtype: type) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.array(value, dtype=dtype), name)


def quantizer(x: str, y: str, grid: str) -> list[onnx.NodeProto]:
    """Q -> integer Clip -> DQ on the constants ``{grid}_s``, ``_z``, ``_lo``, ``_hi``."""
    return [
        helper.make_node("QuantizeLinear", [x, f"{grid}_s", f"{grid}_z"], [f"{y}_q"]),
        helper.make_node("Clip", [f"{y}_q", f"{grid}_lo", f"{grid}_hi"], [f"{y}_c"]),
        helper.make_node("DequantizeLinear", [f"{y}_c", f"{grid}_s", f"{grid}_z"], [y]),
    ]


def grid_constants(grid: str, scale: float, zero: int, lo: int, hi: int, dtype: type = np.uint8) -> list:
    return [
        scalar(f"{grid}_s", scale, np.float32),
        scalar(f"{grid}_z", zero, dtype),
        scalar(f"{grid}_lo", lo, dtype),
        scalar(f"{grid}_hi", hi, dtype),
    ]


def model(nodes: list, inputs: dict[str, list], output: tuple[str, list], constants: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])],
        constants,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def rewritten(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, OpenVINOForm]:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    form = openvino_form(copy)
    onnx.checker.check_model(copy, full_check=True)
    return copy, form


@st.composite
def grids_and_inputs(draw):
    dtype = draw(st.sampled_from(sorted(CODE_TYPES, key=str)))
    info = np.iinfo(dtype)
    zero = draw(st.integers(info.min, info.max))
    lo = draw(st.integers(info.min, info.max))
    hi = draw(st.integers(lo, info.max))
    scale = draw(
        st.one_of(
            st.integers(-8, 4).map(lambda k: 2.0**k),
            st.floats(2.0**-10, 10.0, width=32),
        )
    )
    # codes around and beyond the clip range, exactly on rounding ties and next to them
    codes = draw(st.lists(st.integers(int(info.min) - 300, int(info.max) + 300), min_size=1, max_size=64))
    offsets = draw(
        st.lists(
            st.sampled_from([0.0, 0.5, -0.5, 0.49999997, 0.50000006]) | st.floats(-1, 1, width=32),
            min_size=len(codes),
            max_size=len(codes),
        )
    )
    x = (np.array(codes, np.float64) - zero + np.array(offsets)) * scale
    return dtype, scale, zero, lo, hi, x.astype(np.float32)


@given(grids_and_inputs())
def test_clip_before_quantize_gives_the_same_codes_in_onnxruntime(case):
    dtype, scale, zero, lo, hi, x = case
    proto = model(
        quantizer("x", "y", "a"),
        {"x": [len(x)]},
        ("y", [len(x)]),
        grid_constants("a", scale, zero, lo, hi, dtype),
    )
    form_proto, form = rewritten(proto)
    info = np.iinfo(dtype)
    ops = [n.op_type for n in form_proto.graph.node]
    if info.min != zero:  # signed codes keep the integer Clip (see openvino_form)
        assert form == OpenVINOForm(0, 0, 0, 0) and ops == ["QuantizeLinear", "Clip", "DequantizeLinear"]
    elif (lo, hi) == (info.min, info.max):
        assert form == OpenVINOForm(0, 0, 1, 0) and ops == ["QuantizeLinear", "DequantizeLinear"]
    else:
        assert form == OpenVINOForm(0, 0, 1, 0) and ops == ["Clip", "QuantizeLinear", "DequantizeLinear"]
    expected = run(proto, {"x": x})
    assert np.array_equal(run(form_proto, {"x": x}), expected)
    assert expected.min() >= (lo - zero) * np.float32(scale) and expected.max() <= (hi - zero) * np.float32(
        scale
    )


def test_a_quantizer_after_concat_moves_onto_the_inputs_off_its_grid():
    # a is on the grid (quantized before), b is not: only b gets the quantizer
    nodes = [
        *quantizer("a_in", "a", "g"),
        helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
        *quantizer("cat", "y", "g"),
        helper.make_node("Neg", ["y"], ["out"]),
    ]
    proto = model(
        nodes, {"a_in": [1, 2, 3], "b": [1, 2, 3]}, ("out", [1, 4, 3]), grid_constants("g", 0.25, 0, 0, 63)
    )
    form_proto, form = rewritten(proto)
    assert form == OpenVINOForm(moved_through_concat=1, dropped=0, clips_moved=2, norms_guarded=0)
    concat = next(n for n in form_proto.graph.node if n.op_type == "Concat")
    producers = {o: n for n in form_proto.graph.node for o in n.output}
    assert concat.input[0] == "a" and producers[concat.input[1]].op_type == "DequantizeLinear"
    assert producers["out"].input[0] == "cat"  # nothing quantizes after the Concat any more
    rng = np.random.default_rng(0)
    feeds = {k: (rng.standard_normal((1, 2, 3)) * 8).astype(np.float32) for k in ("a_in", "b")}
    feeds["b"][0, 0, :] = [0.125, 0.375, 15.875]  # ties at step 0.25, and the top code
    assert np.array_equal(run(form_proto, feeds), run(proto, feeds))


def two_quantizers(
    first: tuple, second: tuple, between: str = "MaxPool", output_is_graph_output: bool = False
) -> onnx.ModelProto:
    """x -> quantizer on grid ``first`` -> ``between`` -> quantizer on grid ``second`` (-> Neg)."""
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]} if between == "MaxPool" else {}
    nodes = [
        *quantizer("x", "a", "f"),
        helper.make_node(between, ["a"], ["p"], **pool),
        *quantizer("p", "y", "s"),
    ]
    if not output_is_graph_output:
        nodes.append(helper.make_node("Neg", ["y"], ["out"]))
    constants = grid_constants("f", *first) + grid_constants("s", *second)
    shape = [1, 2, 2, 2] if between == "MaxPool" else [1, 2, 4, 4]
    return model(nodes, {"x": [1, 2, 4, 4]}, ("y" if output_is_graph_output else "out", shape), constants)


def test_a_quantizer_on_values_already_on_its_grid_is_dropped():
    rng = np.random.default_rng(1)
    x = {"x": (rng.standard_normal((1, 2, 4, 4)) * 40).astype(np.float32)}
    cases = {
        # (first grid, op between, second grid): dropped?
        ((1.0, 0, 0, 63), "MaxPool", (1.0, 0, 0, 255)): True,  # narrower grid first: identity
        ((1.0, 0, 0, 63), "MaxPool", (1.0, 0, 0, 63)): True,
        ((1.0, 0, 0, 255), "MaxPool", (1.0, 0, 0, 63)): False,  # the second one clips
        ((1.0, 0, 0, 63), "MaxPool", (0.5, 0, 0, 255)): False,  # another scale
        ((1.0, 0, 0, 63), "MaxPool", (1.0, 3, 0, 255)): False,  # another zero point
        ((1.0, 100, 37, 163), "Relu", (1.0, 100, 100, 163)): True,  # Relu lifts codes to zp
        ((1.0, 100, 37, 163), "Identity", (1.0, 100, 100, 163)): False,  # no Relu: clips
    }
    for (first, between, second), dropped in cases.items():
        proto = two_quantizers(first, second, between)
        form_proto, form = rewritten(proto)
        assert form.dropped == int(dropped), (first, between, second)
        assert Counter(n.op_type for n in form_proto.graph.node)["QuantizeLinear"] == 2 - dropped
        assert np.array_equal(run(form_proto, x), run(proto, x)), (first, second)
    # a quantizer whose output is the graph's output keeps its name and place
    proto = two_quantizers((1.0, 0, 0, 63), (1.0, 0, 0, 63), output_is_graph_output=True)
    form_proto, form = rewritten(proto)
    assert form.dropped == 0 and form_proto.graph.node[-1].output[0] == "y"


def test_default_recipe_ir_fuses_every_activation_quantizer(tmp_path):
    torch.manual_seed(0)
    from qseg.models import PaperUNet

    q = qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), example_inputs=torch.randn(2, 1, 32, 32)).eval()
    c = qseg.convert(q)
    onnx_path = export_onnx(c, torch.randn(1, 1, 32, 32), tmp_path / "m.onnx")
    form_proto, form = rewritten(onnx.load(str(onnx_path)))
    # three decoder concatenations; each of the 13 integer convs re-quantized an input
    # that was on its grid already; 17 quantizers remain (14 after BatchNorm, 3 upsampled)
    assert form == OpenVINOForm(moved_through_concat=3, dropped=13, clips_moved=17, norms_guarded=0)
    x = torch.randn(2, 1, 40, 48)
    assert np.array_equal(run(form_proto, {"x": x.numpy()}), run(onnx.load(str(onnx_path)), {"x": x.numpy()}))

    fused = openvino_from_onnx(onnx_path, tmp_path / "fused.xml")
    plain = openvino_from_onnx(onnx_path, tmp_path / "plain.xml", fuse_quantizers=False)
    between = ("FakeQuantize", "Convert", "Eltwise")  # ops the plugin runs between convs
    assert runtime_precisions(fused, layer_types=between) == []
    assert len(runtime_precisions(plain, layer_types=between)) >= 13
    for ir in (fused, plain):
        assert Counter(p.precision for p in runtime_precisions(ir)) == {"u8": 13, "f32": 2}
        (result,) = check_parity(c, x, None, ir)
        assert result.max_abs_diff == 0.0, result


def test_openvino_rounds_ties_to_even_like_onnxruntime(tmp_path):
    # every half-integer code from below the range to above it, and its float neighbours;
    # the signed grid is the case openvino_form leaves alone: as one FakeQuantize from
    # -128 * s, OpenVINO moved the neighbours of 126 ties onto them
    halves = np.arange(-70, 140, dtype=np.float32) + np.float32(0.5)
    codes = np.concatenate([halves, np.nextafter(halves, -np.inf), np.nextafter(halves, np.inf)])
    for scale, lo, hi, dtype in ((1.0, 0, 63, np.uint8), (0.25, -63, 63, np.int8), (0.5, 0, 255, np.uint8)):
        proto = model(
            quantizer("x", "y", "g"),
            {"x": [codes.size]},
            ("y", [codes.size]),
            grid_constants("g", scale, 0, lo, hi, dtype),
        )
        onnx.save(proto, tmp_path / "q.onnx")
        ir = openvino_from_onnx(tmp_path / "q.onnx", tmp_path / "q.xml")
        x = codes * np.float32(scale)
        expected = run(proto, {"x": x})
        (got,) = run_openvino(ir, (torch.from_numpy(x),))
        assert np.array_equal(got, expected), (scale, lo, hi)
        inside = (halves > lo) & (halves < hi)
        assert (expected[: halves.size][inside] / scale % 2 == 0).all()  # half to even


def test_openvino_runs_a_residual_over_an_int8_conv_on_dynamic_shapes(tmp_path):
    """An int8 conv whose output feeds a quantized branch and a residual Add (MONAI's
    SegResNet block). Compiled for dynamic shapes, OpenVINO 2026.4 scales that conv's
    output twice (max |diff| 1.2 here); run_openvino compiles for the inputs' shapes."""
    rng = np.random.default_rng(0)
    channels = 8
    inits = [
        scalar("sx", 0.03, np.float32),
        scalar("zx", 134, np.uint8),
        scalar("sr", 0.02, np.float32),
        scalar("zr", 0, np.uint8),
        onnx.numpy_helper.from_array(rng.integers(-63, 64, (channels, 1, 3, 3)).astype(np.int8), "wa"),
        onnx.numpy_helper.from_array((0.004 + 0.002 * rng.random(channels)).astype(np.float32), "swa"),
        onnx.numpy_helper.from_array(rng.integers(-63, 64, (channels, channels, 3, 3)).astype(np.int8), "wb"),
        onnx.numpy_helper.from_array((0.0015 + 0.001 * rng.random(channels)).astype(np.float32), "swb"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wa", "swa"], ["wad"], axis=0),
        helper.make_node("Conv", ["xd", "wad"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "sr", "zr"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "sr", "zr"], ["rd"]),
        helper.make_node("DequantizeLinear", ["wb", "swb"], ["wbd"], axis=0),
        helper.make_node("Conv", ["rd", "wbd"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    path = tmp_path / "residual.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    x = torch.from_numpy(rng.standard_normal((1, 1, 64, 64)).astype(np.float32))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    (expected,) = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )
    (got,) = run_openvino(path, (x,), threads=1)
    compiled = compile_openvino(path, threads=1, shapes=[x.shape])
    assert np.array_equal(compiled([x.numpy()])[compiled.output(0)], got)
    # a value on a rounding tie of the Relu's quantizer may move one code (0.012 here);
    # the doubled scale leaves the residual out (max |diff| 1.2 before the fix)
    assert np.abs(got - expected).max() < 0.05
    assert (np.abs(got - expected) < 1e-5).mean() > 0.99


def test_compile_openvino_refuses_shapes_that_do_not_fit(tmp_path):
    onnx_path = export_onnx(torch.nn.Conv2d(1, 2, 3), torch.randn(1, 1, 8, 8), tmp_path / "c.onnx")
    with pytest.raises(ExportError, match="2 shapes for a model of 1 inputs"):
        compile_openvino(onnx_path, shapes=[(1, 1, 8, 8), (1, 1, 8, 8)])
    with pytest.raises(ExportError, match=r"input shapes \[\(1, 3, 8, 8\)\]"):
        compile_openvino(onnx_path, shapes=[(1, 3, 8, 8)])


def _small(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` with weights and bias scaled by 0.01: the norm after it sees a variance
    near its epsilon, where the epsilon decides the output."""
    with torch.no_grad():
        conv.weight.mul_(0.01)
        if conv.bias is not None:
            conv.bias.mul_(0.01)
    return conv


class _QuantizedAdd(nn.Module):
    """Two quantized branches added, then a GroupNorm: a pre-activation residual join."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _small(nn.Conv2d(3, 8, 3, padding=1)), _small(nn.Conv2d(3, 8, 1))
        self.norm, self.head = nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = torch.relu(self.a(x)) + torch.relu(self.b(x))
        return self.head(nn.functional.leaky_relu(self.norm(joined)))


def _bias_free_conv_then_norm() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.LeakyReLU(),
        _small(nn.Conv2d(8, 8, 3, padding=1, bias=False)),
        nn.InstanceNorm2d(8, affine=True),
        nn.LeakyReLU(),
        nn.Conv2d(8, 2, 1),
    )


def _quantized_pool_then_norm() -> nn.Module:
    return nn.Sequential(
        _small(nn.Conv2d(3, 8, 3, padding=1)),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.InstanceNorm2d(8, affine=True),
        nn.LeakyReLU(),
        nn.Conv2d(8, 2, 1),
    )


@pytest.mark.parametrize(
    "build",
    [_bias_free_conv_then_norm, _quantized_pool_then_norm, _QuantizedAdd],
    ids=["bias-free conv, InstanceNorm", "quantized MaxPool, InstanceNorm", "quantized add, GroupNorm"],
)
def test_openvino_keeps_the_epsilon_of_a_norm_after_a_bare_scale(build, tmp_path):
    """A norm whose input ends in a dequantization scale and whose variance is near its
    epsilon: without the guard, OpenVINO 2026.4 normalizes the unscaled integers with the
    same epsilon, and 18-40 % of these models' outputs stayed within one step."""
    torch.manual_seed(0)
    model = build()
    x = torch.randn(1, 3, 32, 32)
    q = qseg.prepare(model, "int8", example_inputs=x)
    qseg.calibrate(q, [x, torch.randn(1, 3, 32, 32)], progress=False)
    c = qseg.convert(q.eval())
    onnx_path = export_onnx(c, x, tmp_path / "m.onnx", dynamic=False)
    _, form = rewritten(onnx.load(str(onnx_path)))
    assert form.norms_guarded == 1
    onnx_result, openvino_result = check_parity(
        c, x, onnx_path, openvino_from_onnx(onnx_path, tmp_path / "m.xml")
    )
    assert onnx_result.max_abs_diff <= onnx_result.step, onnx_result
    assert openvino_result.max_abs_diff <= openvino_result.step, openvino_result


def norm_after_quantizer(
    norm: str, dtype: type, zero: int, lo: int, hi: int, scale: float, clip: bool, transpose: bool = False
):
    """x -> Q -> (integer Clip) -> DQ -> (Transpose of the spatial axes) ->
    InstanceNormalization / GroupNormalization (2 groups) over 4 channels, epsilon 1e-5, the
    affine parameters away from 1 and 0."""
    nodes = quantizer("x", "v", "g") if clip else [
        helper.make_node("QuantizeLinear", ["x", "g_s", "g_z"], ["v_q"]),
        helper.make_node("DequantizeLinear", ["v_q", "g_s", "g_z"], ["v"]),
    ]  # fmt: skip
    if transpose:
        nodes.append(helper.make_node("Transpose", ["v"], ["v_moved"], perm=[0, 1, 3, 2]))
    attrs = {"epsilon": 1e-5} | ({"num_groups": 2} if norm == "GroupNormalization" else {})
    nodes.append(helper.make_node(norm, ["v_moved" if transpose else "v", "gamma", "beta"], ["y"], **attrs))
    constants = [
        *grid_constants("g", scale, zero, lo, hi, dtype),
        onnx.numpy_helper.from_array(np.array([0.5, 1.0, 1.5, 2.0], np.float32), "gamma"),
        onnx.numpy_helper.from_array(np.array([0.1, -0.2, 0.3, 0.0], np.float32), "beta"),
    ]
    return model(nodes, {"x": [2, 4, 5, 6]}, ("y", [2, 4, 6, 5] if transpose else [2, 4, 5, 6]), constants)


@given(
    case=grids_and_inputs(),
    norm=st.sampled_from(["InstanceNormalization", "GroupNormalization"]),
    clip=st.booleans(),
    transpose=st.booleans(),
)
def test_a_norm_after_a_quantizer_reads_its_codes_and_computes_the_same(case, norm, clip, transpose):
    """Step 5: the DequantizeLinear before a norm (directly or through a Transpose) gets
    scale 1 and zero point 0 and the norm epsilon / s^2, and onnxruntime computes the same
    normalized values."""
    dtype, scale, zero, lo, hi, x = case
    x = np.resize(x, (2, 4, 5, 6)).astype(np.float32)  # the drawn values, repeated
    proto = norm_after_quantizer(norm, dtype, zero, lo, hi, scale, clip, transpose)
    # unoptimized: onnxruntime's QDQ propagation mistypes int8 codes moved past a Transpose
    before = run(proto, {"x": x}, optimize=False)
    # onnxruntime's GroupNormalization takes the variance as E[x^2] - E[x]^2, which a
    # group of equal large values can make negative: NaN from the model as exported
    assume(np.isfinite(before).all())
    after_proto, form = rewritten(proto)
    assert form.norms_on_codes == 1 and form.norms_guarded == 0
    dq = next(n for n in after_proto.graph.node if n.op_type == "DequantizeLinear")
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in after_proto.graph.initializer}
    assert constants[dq.input[1]] == 1 and constants[dq.input[2]] == 0
    after = run(after_proto, {"x": x}, optimize=False)
    # Both graphs compute the norm in float32 from other addends (the codes q, against
    # s * (q - zp)), so they differ by rounding: of the mean, relative to the standard
    # deviation (with epsilon) in codes, and of a variance taken as E[x^2] - E[x]^2, relative
    # to the variance. A channel whose codes are all equal, or all but one, shows it most.
    info = np.iinfo(dtype)
    low, high = (lo, hi) if clip else (info.min, info.max)
    q = np.clip(np.round(x.astype(np.float64) / scale) + zero, low, high)
    groups = q.reshape(2, 2 if norm == "GroupNormalization" else 4, -1)
    spread = np.sqrt(groups.var(axis=-1) + 1e-5 / scale**2)
    magnitude = np.abs(groups).max(axis=-1) + np.abs(groups - zero).max(axis=-1) + 1
    ulps = 64 * 2.0**-24
    largest = np.abs(before).max()
    bound = (2.0 * ulps * magnitude / spread + largest * ulps * (magnitude / spread) ** 2).max() + 1e-5
    assert np.abs(after - before).max() <= bound


def test_the_epsilon_of_a_norm_on_codes_is_scaled():
    """A channel whose variance is near epsilon: with the codes but the model's epsilon the
    norm's output moves by far more than float rounding (so the test above can fail)."""
    proto = norm_after_quantizer("InstanceNormalization", np.int8, 0, -127, 127, 1e-3, clip=True)
    x = (np.random.default_rng(0).standard_normal((2, 4, 5, 6)) * 3e-3).astype(np.float32)
    before = run(proto, {"x": x})
    after_proto, form = rewritten(proto)
    assert form.norms_on_codes == 1
    np.testing.assert_allclose(run(after_proto, {"x": x}), before, rtol=0, atol=2e-5)
    norm = next(n for n in after_proto.graph.node if n.op_type == "InstanceNormalization")
    epsilon = next(a for a in norm.attribute if a.name == "epsilon")
    assert epsilon.f == pytest.approx(1e-5 / 1e-6, rel=1e-6)
    epsilon.f = 1e-5
    assert np.abs(run(after_proto, {"x": x}) - before).max() > 0.05


def test_a_quantizer_with_another_reader_than_the_norm_keeps_its_scale():
    proto = norm_after_quantizer("InstanceNormalization", np.uint8, 128, 0, 255, 0.1, clip=True)
    proto.graph.node.append(helper.make_node("Relu", ["v"], ["r"]))
    proto.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 4, 5, 6]))
    _, form = rewritten(proto)
    assert form.norms_on_codes == 0 and form.norms_guarded == 1


class _ConvNorm(nn.Module):
    """conv -> norm -> LeakyReLU -> conv, the first conv's output small enough that the
    norm's epsilon decides part of its output."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv, self.norm = _small(nn.Conv2d(8, 8, 3, padding=1)), norm
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.leaky_relu(self.stem(x))
        return self.head(nn.functional.leaky_relu(self.norm(self.conv(x))))


@pytest.mark.parametrize(
    "norm", [nn.InstanceNorm2d(8, affine=True), nn.GroupNorm(2, 8)], ids=["InstanceNorm", "GroupNorm"]
)
def test_openvino_runs_a_norm_on_the_codes_of_quantize_norm_inputs(norm, tmp_path):
    """``quantize_norm_inputs``: OpenVINO runs the norm on 8-bit input (the conv before it
    writes codes) and keeps every output within one step of the converted model."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    recipe = qseg.recipes.load("int8").replace(quantize_norm_inputs=True)
    q = qseg.prepare(_ConvNorm(norm), recipe, example_inputs=x)
    qseg.calibrate(q, [x, torch.randn(1, 3, 32, 32)], progress=False)
    c = qseg.convert(q.eval())
    onnx_path = export_onnx(c, x, tmp_path / "m.onnx", dynamic=False)
    _, form = rewritten(onnx.load(str(onnx_path)))
    assert (form.norms_on_codes, form.norms_guarded) == (1, 0)
    xml = openvino_from_onnx(onnx_path, tmp_path / "m.xml")
    precisions = {p.layer_type: p.precision for p in runtime_precisions(xml, layer_types=("MVN",))}
    assert precisions["MVN"] in ("u8", "i8")
    onnx_result, openvino_result = check_parity(c, x, onnx_path, xml)
    assert onnx_result.max_abs_diff <= onnx_result.step, onnx_result
    assert openvino_result.max_abs_diff <= openvino_result.step, openvino_result


def bare_quantizer(x: str, y: str, grid: str) -> list[onnx.NodeProto]:
    """Q -> DQ without a Clip, as the exporter writes a grid whose codes use their whole type."""
    return [
        helper.make_node("QuantizeLinear", [x, f"{grid}_s", f"{grid}_z"], [f"{y}_q"]),
        helper.make_node("DequantizeLinear", [f"{y}_q", f"{grid}_s", f"{grid}_z"], [y]),
    ]


@given(case=grids_and_inputs(), clip=st.booleans())
def test_a_quantizer_moves_above_reshape_and_transpose_with_the_same_codes(case, clip):
    """Step 6: x -> Relu -> Reshape -> Transpose -> quantizer becomes Relu -> quantizer ->
    Reshape -> Transpose, and onnxruntime computes the same values bit for bit."""
    dtype, scale, zero, lo, hi, x = case
    x = np.resize(x, (2, 6)).astype(np.float32)
    nodes = [
        helper.make_node("Neg", ["x"], ["n"]),
        helper.make_node("Reshape", ["n", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 1]),
        *(quantizer if clip else bare_quantizer)("t", "y", "g"),
        helper.make_node("Neg", ["y"], ["out"]),
    ]
    shape = onnx.numpy_helper.from_array(np.array([2, 3, 2], np.int64), "shape")
    proto = model(
        nodes, {"x": [2, 6]}, ("out", [2, 2, 3]), [*grid_constants("g", scale, zero, lo, hi, dtype), shape]
    )
    form_proto, form = rewritten(proto)
    assert form.moved_above_data_movement == 2
    order = [n.op_type for n in form_proto.graph.node]
    assert order.index("QuantizeLinear") < order.index("Reshape") < order.index("Transpose")
    # onnxruntime's own QDQ propagation mistypes int8 codes moved past a Reshape (a type
    # error at load): the graphs run as written
    after, before = (run(p, {"x": x}, optimize=False) for p in (form_proto, proto))
    assert np.array_equal(after, before, equal_nan=True)


def test_a_quantizer_without_clip_moves_through_concat():
    """Step 1 on a grid whose codes use their whole type (int8's, written without a Clip)."""
    nodes = [
        *bare_quantizer("a_in", "a", "g"),
        helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
        *bare_quantizer("cat", "y", "g"),
        helper.make_node("Neg", ["y"], ["out"]),
    ]
    proto = model(
        nodes, {"a_in": [1, 2, 3], "b": [1, 2, 3]}, ("out", [1, 4, 3]), grid_constants("g", 0.25, 128, 0, 255)
    )
    form_proto, form = rewritten(proto)
    assert form.moved_through_concat == 1 and form.clips_moved == 0
    producers = {o: n for n in form_proto.graph.node for o in n.output}
    concat = next(n for n in form_proto.graph.node if n.op_type == "Concat")
    assert concat.input[0] == "a" and producers[concat.input[1]].op_type == "DequantizeLinear"
    rng = np.random.default_rng(0)
    feeds = {k: (rng.standard_normal((1, 2, 3)) * 20).astype(np.float32) for k in ("a_in", "b")}
    assert np.array_equal(run(form_proto, feeds), run(proto, feeds))
