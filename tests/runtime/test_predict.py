"""qseg.predict: MONAI's sliding-window inference, on exported files and PyTorch modules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import qseg
from qseg.errors import DataError, ExportError
from qseg.exporters import compile_openvino
from qseg.exporters.parity import compare, parity_step
from qseg.models import PaperUNet
from qseg.runtime import onnxruntime_session
from qseg.runtime.predict import window_starts, window_weights
from qseg.runtime.settings import InferenceSettings, read_settings

monai = pytest.importorskip("monai")
from monai.data.utils import compute_importance_map, dense_patch_slices  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402
from monai.inferers.utils import _get_scan_interval  # noqa: E402


@given(
    size=st.integers(1, 300),
    window=st.integers(1, 128),
    overlap=st.floats(0, 0.95),
)
def test_window_starts_are_monais_and_cover_the_axis(size, window, overlap):
    starts = window_starts(size, window, overlap)
    covered = np.zeros(max(size, window), bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered.all()
    assert starts == sorted(set(starts))
    assert all(0 <= s <= max(size - window, 0) for s in starts)
    padded = max(size, window)
    interval = _get_scan_interval((padded,), (window,), 1, (overlap,))
    expected = [s for ((s, _),) in dense_patch_slices((padded,), (window,), interval, return_slice=False)]
    assert starts == expected


@pytest.mark.parametrize("roi", [(16,), (7, 12), (5, 8, 9)])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_window_weights_are_monais(roi, blend):
    expected = compute_importance_map(roi, mode=blend, sigma_scale=0.125).numpy()
    np.testing.assert_allclose(window_weights(roi, blend), expected, rtol=1e-6, atol=0)


def _int8_model(model: nn.Module, example: torch.Tensor) -> nn.Module:
    qmodel = qseg.prepare(model, "int8", example_inputs=example)
    gen = torch.Generator().manual_seed(3)
    qseg.calibrate(qmodel, [torch.rand(example.shape, generator=gen) for _ in range(3)], progress=False)
    return qseg.convert(qmodel.eval())


def _monai(model: nn.Module, image: np.ndarray, roi, overlap: float, blend: str) -> np.ndarray:
    with torch.no_grad():
        out = sliding_window_inference(
            torch.from_numpy(image)[None], roi, sw_batch_size=3, predictor=model, overlap=overlap, mode=blend
        )
    return out[0].numpy()


@pytest.fixture(scope="module")
def unet2d(tmp_path_factory):
    torch.manual_seed(0)
    example = torch.rand(1, 1, 48, 64)
    converted = _int8_model(PaperUNet(widths=(4, 8, 8, 8)), example)
    folder = tmp_path_factory.mktemp("unet2d")
    xml = qseg.export_openvino(converted, example, folder / "m.xml")
    onnx_file = qseg.export_onnx(converted, example, folder / "m.onnx")
    return converted, xml, onnx_file


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_2d_ir_and_onnx_equal_monai_on_the_converted_model(unet2d, blend):
    converted, xml, onnx_file = unet2d
    image = np.random.default_rng(0).random((1, 150, 97), np.float32)  # odd sizes, several windows
    expected = _monai(converted, image, (48, 64), 0.25, blend)
    step = parity_step(converted)
    for runtime, model in (("openvino", xml), ("onnxruntime", onnx_file), ("torch", converted)):
        got = qseg.predict(model, image, (48, 64), overlap=0.25, blend=blend, batch_size=2)
        assert got.shape == expected.shape == (1, 150, 97)
        result = compare(runtime, [expected], [got], step)
        assert result.ok, result
    # PyTorch through predict is MONAI's blend of the same windows, up to float summation order
    np.testing.assert_allclose(qseg.predict(converted, image, (48, 64), blend=blend), expected, atol=1e-5)


def test_3d_ir_equals_monai_on_the_converted_model(tmp_path):
    model = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
        nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
        nn.Conv3d(4, 2, 1),
    )  # fmt: skip
    example = torch.rand(1, 1, 8, 16, 16)
    converted = _int8_model(model, example)
    xml = qseg.export_openvino(converted, example, tmp_path / "m3.xml")
    image = np.random.default_rng(1).random((1, 13, 30, 21), np.float32)
    step = parity_step(converted)
    for blend in ("gaussian", "constant"):
        expected = _monai(converted, image, (8, 16, 16), 0.5, blend)
        got = qseg.predict(xml, image, (8, 16, 16), overlap=0.5, blend=blend, batch_size=3)
        assert got.shape == (2, 13, 30, 21)
        result = compare("openvino", [expected], [got], step)
        assert result.ok, result


def test_an_image_smaller_than_the_window_is_padded_and_cropped_back_as_monai_does():
    conv = nn.Conv2d(1, 3, 3, padding=1)
    image = np.random.default_rng(2).random((1, 20, 33), np.float32)
    got = qseg.predict(conv, image, (32, 32))
    assert got.shape == (3, 20, 33)
    np.testing.assert_allclose(got, _monai(conv, image, (32, 32), 0.25, "gaussian"), atol=1e-6)


def test_tuple_and_dict_outputs_are_blended_each():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 1, 3, padding=1), nn.Conv2d(2, 4, 1)

        def forward(self, x):
            return {"mask": self.a(x), "classes": self.b(x)}

    heads = Heads()
    image = np.random.default_rng(3).random((2, 40, 50), np.float32)
    out = qseg.predict(heads, image, (16, 16), blend="constant")
    assert list(out) == ["mask", "classes"]
    with torch.no_grad():
        whole = heads(torch.from_numpy(image)[None])
    # a 1x1 conv sees no neighbours: any blend of its windows is the whole-image output
    np.testing.assert_allclose(out["classes"], whole["classes"][0].numpy(), atol=1e-5)
    assert out["mask"].shape == (1, 40, 50)

    tupled = qseg.predict(lambda_module(lambda x: (x * 2, x[:, :1])), image, (16, 16))
    assert isinstance(tupled, tuple) and [t.shape for t in tupled] == [(2, 40, 50), (1, 40, 50)]
    np.testing.assert_allclose(tupled[0], image * 2, rtol=1e-6)


class lambda_module(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_bad_input_is_refused_with_what_to_fix(unet2d, tmp_path):
    conv = nn.Conv2d(1, 1, 3, padding=1)
    image = np.zeros((1, 32, 32), np.float32)
    with pytest.raises(DataError, match="channels first without a batch axis"):
        qseg.predict(conv, np.zeros((1, 1, 1, 32, 32)), (16, 16))
    with pytest.raises(DataError, match="one positive size per spatial axis"):
        qseg.predict(conv, image, (16, 16, 16))
    with pytest.raises(DataError, match=r"overlap must be in \[0, 1\)"):
        qseg.predict(conv, image, (16, 16), overlap=1.0)
    with pytest.raises(DataError, match="batch_size"):
        qseg.predict(conv, image, (16, 16), batch_size=0)
    with pytest.raises(DataError, match="blend must be"):
        qseg.predict(conv, image, (16, 16), blend="linear")
    with pytest.raises(DataError, match="spatial shape"):
        qseg.predict(nn.Conv2d(1, 1, 3, stride=2), image, (16, 16))
    with pytest.raises(ExportError, match="no model file"):
        qseg.predict(tmp_path / "missing.xml", image, (16, 16))
    (tmp_path / "m.pt").write_bytes(b"")
    with pytest.raises(ExportError, match=r"\.xml\) or an ONNX file"):
        qseg.predict(tmp_path / "m.pt", image, (16, 16))
    _, xml, _ = unet2d
    compiled = compile_openvino(xml, shapes=[(1, 1, 48, 64)])
    with pytest.raises(ExportError, match=r"compile it with compile_openvino\(path, shapes="):
        qseg.predict(compiled, np.zeros((1, 100, 100), np.float32), (48, 64), batch_size=4)


def test_a_compiled_model_and_a_session_of_the_right_shape_are_used_as_given(unet2d):
    _, xml, onnx_file = unet2d
    image = np.random.default_rng(4).random((1, 90, 90), np.float32)
    from_path = qseg.predict(xml, image, (48, 64), batch_size=2)
    compiled = compile_openvino(xml, shapes=[(2, 1, 48, 64)])
    np.testing.assert_array_equal(qseg.predict(compiled, image, (48, 64), batch_size=2), from_path)
    session = onnxruntime_session(onnx_file, threads=1)
    np.testing.assert_array_equal(
        qseg.predict(session, image, (48, 64), batch_size=2),
        qseg.predict(onnx_file, image, (48, 64), batch_size=2),
    )


def test_the_files_recorded_settings_make_the_raw_image_enough(tmp_path):
    conv = nn.Conv2d(1, 1, 3, padding=1)
    x = torch.rand(1, 1, 32, 32)
    settings = InferenceSettings(roi_size=(32, 32), overlap=0.5, blend="constant", normalize="zscore")
    xml = qseg.export_openvino(conv, x, tmp_path / "m.xml", inference=settings)
    onnx_file = qseg.export_onnx(conv, x, tmp_path / "m.onnx", inference=dataclasses.asdict(settings))
    assert read_settings(xml) == read_settings(onnx_file) == settings
    raw = np.random.default_rng(5).normal(1000, 50, (1, 70, 45)).astype(np.float32)  # camera counts
    z = (raw - raw.mean()) / raw.std()
    expected = qseg.predict(conv, z, (32, 32), overlap=0.5, blend="constant")
    for model in (xml, onnx_file):
        np.testing.assert_allclose(qseg.predict(model, raw), expected, atol=1e-4)
    # an explicit argument wins over the file's
    np.testing.assert_allclose(qseg.predict(xml, z, normalize="none"), expected, atol=1e-4)
    plain = qseg.export_onnx(conv, x, tmp_path / "plain.onnx")
    assert read_settings(plain) is None
    with pytest.raises(DataError, match="roi_size is needed"):
        qseg.predict(plain, raw)


def test_settings_are_checked_and_read_the_output():
    with pytest.raises(ExportError, match="roi_size must be positive integers"):
        InferenceSettings(roi_size=(0, 64))
    with pytest.raises(ExportError, match="normalize must be one of"):
        InferenceSettings(normalize="minmax")
    with pytest.raises(ExportError, match="not qseg's inference settings"):
        InferenceSettings.from_json('{"window": 3}')
    logits = np.array([[[-2.0, 0.5, 3.0]]])
    assert InferenceSettings().mask(logits).tolist() == [[0, 1, 1]]
    assert InferenceSettings(activation="sigmoid", threshold=0.9).mask(logits).tolist() == [[0, 0, 1]]
    three = np.stack([logits[0], -logits[0], np.zeros_like(logits[0])])
    assert InferenceSettings().mask(three).tolist() == [[1, 0, 0]]
