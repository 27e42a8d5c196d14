"""`qseg predict`: real TIFF, NIfTI and .npy files in, masks of the same format and geometry out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qseg
from qseg import cli
from qseg.errors import DataError
from qseg.images import read_image, write_mask

tifffile = pytest.importorskip("tifffile")
nibabel = pytest.importorskip("nibabel")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _exported(model: nn.Module, example: torch.Tensor, path) -> tuple[nn.Module, object]:
    qmodel = qseg.prepare(model, "int8", example_inputs=example)
    gen = torch.Generator().manual_seed(0)
    qseg.calibrate(qmodel, [torch.randn(example.shape, generator=gen) for _ in range(2)], progress=False)
    converted = qseg.convert(qmodel.eval())
    writer = qseg.export_openvino if path.suffix == ".xml" else qseg.export_onnx
    return converted, writer(converted, example, path)


@pytest.fixture(scope="module")
def model2d(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1)
    )
    folder = tmp_path_factory.mktemp("m2d")
    converted, xml = _exported(net, torch.randn(1, 1, 32, 32), folder / "m.xml")
    _, onnx_file = _exported(net, torch.randn(1, 1, 32, 32), folder / "m.onnx")
    return converted, xml, onnx_file


def test_tiff_and_npy_masks_are_the_models_prediction(model2d, tmp_path, capsys):
    _, xml, onnx_file = model2d
    image = np.random.default_rng(0).normal(size=(70, 91)).astype(np.float32)
    tifffile.imwrite(tmp_path / "frame.tif", image)
    np.save(tmp_path / "frame2.npy", image)
    for model in (xml, onnx_file):
        out = tmp_path / f"masks_{model.suffix[1:]}"
        code, stdout, err = run(capsys, "predict", model, tmp_path / "frame.tif", tmp_path / "frame2.npy",
                                "--out", out, "--roi", "32,32", "--threads", "1")  # fmt: skip
        assert code == 0, err
        assert "frame.tif: 70x91 in" in stdout and "Mvoxel/s" in stdout
        expected = qseg.predict(model, image[None], (32, 32)) > 0
        mask = tifffile.imread(out / "frame.tif")
        assert mask.dtype == np.uint8 and mask.shape == (70, 91)
        assert (mask == expected[0]).mean() > 0.999  # the CLI compiles once, for every file
        np.testing.assert_array_equal(np.load(out / "frame2.npy"), mask)
        assert sorted(p.name for p in out.iterdir()) == ["frame.tif", "frame2.npy"]


def test_nifti_mask_keeps_the_volumes_geometry(tmp_path, capsys):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1))
    _, xml = _exported(net, torch.randn(1, 1, 8, 16, 16), tmp_path / "m3.xml")
    volume = np.random.default_rng(1).normal(size=(20, 33, 9)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 30.0)
    nibabel.save(nibabel.Nifti1Image(volume, affine), tmp_path / "ct.nii.gz")
    code, _, err = run(capsys, "predict", xml, tmp_path / "ct.nii.gz", "--out", tmp_path / "out",
                            "--roi", "8,16,16", "--normalize", "zscore")  # fmt: skip
    assert code == 0, err
    written = nibabel.load(tmp_path / "out" / "ct.nii.gz")
    assert written.shape == (20, 33, 9)
    np.testing.assert_allclose(written.affine, affine)
    mask = np.asarray(written.dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2}  # argmax of 3 channels
    z = (volume - volume.mean()) / volume.std()
    expected = qseg.predict(xml, z[None], (8, 16, 16)).argmax(0)
    assert (mask == expected).mean() > 0.999


def test_a_corrupt_file_ends_with_status_2_and_writes_nothing(model2d, tmp_path, capsys):
    _, xml, _ = model2d
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 this is not a tiff")
    out = tmp_path / "masks"
    code, _, err = run(capsys, "predict", xml, tmp_path / "broken.tif", "--out", out, "--roi", "32,32")
    assert code == 2
    assert "broken.tif: cannot read it as tiff" in err
    assert list(out.iterdir()) == []


def test_an_unwritable_output_folder_is_refused_before_any_work(model2d, tmp_path, capsys):
    _, xml, _ = model2d
    np.save(tmp_path / "a.npy", np.zeros((32, 32), np.float32))
    (tmp_path / "file").write_text("a file, not a folder")
    code, _, err = run(
        capsys, "predict", xml, tmp_path / "a.npy", "--out", tmp_path / "file" / "masks", "--roi", "32,32"
    )
    assert code == 2
    assert "cannot write masks into" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--roi", "32"), "--roi gives the window of a 2d"),
        (("--roi", "32x32"), "--roi takes comma-separated positive integers"),
    ],
)
def test_bad_options_are_named(model2d, tmp_path, capsys, argv, message):
    _, xml, _ = model2d
    np.save(tmp_path / "a.npy", np.zeros((32, 32), np.float32))
    code, _, err = run(capsys, "predict", xml, tmp_path / "a.npy", "--out", tmp_path / "o", *argv)
    assert code == 2 and message in err


def test_an_image_of_the_wrong_axes_or_format_is_refused(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((2, 3, 8, 8)))
    with pytest.raises(DataError, match=r"does not fit a model of 2 spatial axes"):
        read_image(tmp_path / "v.npy", spatial_dims=2)
    with pytest.raises(DataError, match="the file's ending is none of them"):
        read_image(tmp_path / "v.png", spatial_dims=2)
    with pytest.raises(DataError, match="no such file"):
        read_image(tmp_path / "missing.npy", spatial_dims=2)


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    np.save(tmp_path / "a.npy", np.zeros((4, 4), np.float32))
    image = read_image(tmp_path / "a.npy", spatial_dims=2)

    def fail(*args):
        with open(args[2], "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("qseg.images._write", fail)
    with pytest.raises(DataError, match="No space left on device"):
        write_mask(image, np.zeros((4, 4)), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(DataError, match="would overwrite its image"):
        write_mask(image, np.zeros((4, 4)), tmp_path)


def test_the_window_and_scaling_come_from_the_file_when_not_given(tmp_path, capsys):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
    x = torch.rand(1, 1, 32, 32)
    recorded = qseg.export_openvino(
        net, x, tmp_path / "rec.xml", inference={"roi_size": (32, 32), "normalize": "percentile"}
    )
    plain = qseg.export_openvino(net, x, tmp_path / "plain.xml")
    raw = np.random.default_rng(2).normal(30000, 800, (60, 75)).astype(np.float32)
    tifffile.imwrite(tmp_path / "raw.tif", raw.astype(np.uint16))
    code, _, err = run(capsys, "predict", recorded, tmp_path / "raw.tif", "--out", tmp_path / "out")
    assert code == 0, err
    expected = qseg.predict(recorded, raw.astype(np.uint16).astype(np.float32)[None])[0] > 0
    assert (tifffile.imread(tmp_path / "out" / "raw.tif") == expected).mean() > 0.999
    code, _, err = run(capsys, "predict", plain, tmp_path / "raw.tif", "--out", tmp_path / "out2")
    assert code == 2 and "records no window" in err and "pass --roi" in err
