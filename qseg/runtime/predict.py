"""Sliding-window inference on whole images and volumes: :func:`predict`.

An exported model runs on windows of the size it was trained on; :func:`predict` covers a
larger image with overlapping windows, runs them in batches (on OpenVINO through
asynchronous requests, so every core is busy) and blends the window outputs into one
full-size output. The windows, their weights and the blend are MONAI's
``sliding_window_inference`` (same roi, overlap and mode give the same result), so a model
validated with MONAI in PyTorch predicts the same after export.

Windows: along each spatial axis of size ``n`` a window of size ``r`` starts every
``int(r * (1 - overlap))`` voxels (at least 1; one window where ``r == n``), the last one
moved back to end at the border. An image smaller than the window is padded with zeros
(half before, half after) and the output cropped back. Blend: each output voxel is the mean
of the windows covering it, weighted by ``1`` (``"constant"``) or by a Gaussian centred on
the window with sigma ``sigma_scale * r`` per axis, floored at ``1e-3`` (``"gaussian"``).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qseg.errors import DataError, ExportError
from qseg.images import Normalize
from qseg.runtime.settings import InferenceSettings, read_settings

__all__ = ["Blend", "predict", "window_starts", "window_weights"]

Blend = Literal["gaussian", "constant"]
# a weight below this gives a window's border voxel no say where it alone covers it
_MIN_WEIGHT = 1e-3


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Where the windows along one axis of ``size`` voxels start.

    Example:
        >>> window_starts(10, 4, 0.5)  # every 2 voxels; the last one moved back to end at 10
        [0, 2, 4, 6]
        >>> window_starts(11, 4, 0.25)
        [0, 3, 6, 7]
    """
    if window >= size:
        return [0]
    step = max(int(window * (1 - overlap)), 1)
    count = math.ceil((size - window) / step) + 1
    return [min(k * step, size - window) for k in range(count)]


def window_weights(
    roi_size: Sequence[int], blend: Blend = "gaussian", sigma_scale: float = 0.125
) -> np.ndarray:
    """The weight of each voxel of a window's output in the blend (float32, ``roi_size``).

    Example:
        >>> w = window_weights((5,), "gaussian", sigma_scale=0.5)
        >>> [round(float(v), 3) for v in w]  # exp(-x^2 / (2 * 2.5^2)) for x in -2..2
        [0.726, 0.923, 1.0, 0.923, 0.726]
        >>> window_weights((2, 2), "constant").tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    if blend == "constant":
        return np.ones(tuple(roi_size), np.float32)
    if blend != "gaussian":
        raise DataError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    weights = np.ones((), np.float32)
    for size in roi_size:
        x = np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2)
        axis = np.exp(x**2 / np.float32(-2 * (size * sigma_scale) ** 2)).astype(np.float32)
        weights = np.multiply.outer(weights, axis)
    return np.maximum(weights, np.float32(max(weights.min(), _MIN_WEIGHT))).astype(np.float32)


def predict(
    model: Any,
    image: Any,
    roi_size: Sequence[int] | None = None,
    overlap: float | None = None,
    blend: Blend | None = None,
    batch_size: int = 4,
    progress: bool = False,
    sigma_scale: float = 0.125,
    threads: int | None = None,
    normalize: Normalize | None = None,
) -> np.ndarray | tuple[np.ndarray, ...] | dict[str, np.ndarray]:
    """Run ``model`` on ``image`` window by window and blend the window outputs.

    Args:
        model: an OpenVINO IR (``.xml``) or ONNX file (``.onnx``: onnxruntime runs it),
            a compiled OpenVINO model, an ``onnxruntime.InferenceSession``, or a PyTorch
            module (a converted or float model, run in eval mode on its device). Files
            are compiled by :func:`qseg.exporters.compile_openvino` (exact, static
            window shape, throughput hint) or opened by ``onnxruntime_session``.
        image: a NumPy array or tensor of shape ``(C, H, W)`` or ``(C, D, H, W)``: one
            image, channels first, no batch axis.
        roi_size: the window, one size per spatial axis (e.g. ``(256, 256)``).
        overlap: the fraction of a window its neighbour overlaps, in ``[0, 1)``.
        blend: ``"gaussian"`` (a window's border counts less) or ``"constant"``.
        normalize: per-channel scaling of ``image`` first (``"percentile"``, ``"zscore"``,
            ``"none"``; :func:`qseg.images.normalize`).

    ``roi_size``, ``overlap``, ``blend`` and ``normalize`` left ``None`` come from the
    :class:`~qseg.runtime.InferenceSettings` the exporter recorded in the file (or an
    onnxruntime session's model), else default to no window (an error), 0.25,
    ``"gaussian"`` and ``"none"``: ``qseg.predict("model.xml", raw_image)`` runs a file
    exported with ``inference=`` settings as it was validated.
        batch_size: windows per inference call.
        progress: a progress bar of windows on stderr.
        sigma_scale: the Gaussian's sigma as a fraction of the window, per axis.
        threads: inference threads of a file compiled or opened here (``None``: the
            runtime's choice, all cores).

    Returns:
        The full-size output, float32, ``(C_out, *spatial)``: one array for a model
        with one output, a tuple for several (in the model's order), a dict for a
        PyTorch model that returns one. Every output must have the window's spatial
        size (a deep-supervision head at a lower resolution is refused).

    Raises:
        DataError: the image, window, overlap, blend or batch size does not fit.
        ExportError: the file cannot be read or compiled, or a compiled model's input
            shape does not take ``(batch_size, C, *roi_size)``.

    Example:
        >>> import numpy as np, torch
        >>> conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        >>> out = predict(conv, np.random.rand(1, 100, 70).astype(np.float32), roi_size=(32, 32))
        >>> out.shape
        (2, 100, 70)
    """
    from qseg.images import normalize as scale

    settings = read_settings(model) or InferenceSettings()
    roi_size = roi_size if roi_size is not None else settings.roi_size
    overlap = overlap if overlap is not None else settings.overlap
    blend = blend if blend is not None else settings.blend
    array = _image(image)
    if roi_size is None:
        raise DataError(
            "roi_size is needed: give the window (the training crop size), or export the model with "
            "inference={'roi_size': ...} so the file records it"
        )
    array = scale(array, normalize if normalize is not None else settings.normalize)
    spatial = array.shape[1:]
    roi = _roi(roi_size, spatial)
    if not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise DataError(f"overlap must be in [0, 1), got {overlap!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    weights = window_weights(roi, blend, sigma_scale)

    padded_shape = tuple(max(n, r) for n, r in zip(spatial, roi, strict=True))
    pads = [((p - n) // 2, (p - n) - (p - n) // 2) for n, p in zip(spatial, padded_shape, strict=True)]
    padded = np.pad(array, [(0, 0), *pads]) if any(sum(p) for p in pads) else array
    starts = [window_starts(n, r, overlap) for n, r in zip(padded_shape, roi, strict=True)]
    corners = [
        tuple(int(s) for s in corner)
        for corner in np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, len(roi))
    ]

    blender = _Blender(padded_shape, roi, weights)
    engine = _engine(model, (batch_size, array.shape[0], *roi), blender, threads)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(corners), desc="predict", unit="window")
    try:
        for batch in _batches(corners, batch_size):
            windows = np.stack([padded[(slice(None), *_window(c, roi))] for c in batch])
            engine.submit(windows, batch)
            if bar is not None:
                bar.update(len(batch))
        engine.wait()
    finally:
        if bar is not None:
            bar.close()
    crop = tuple(slice(before, before + n) for (before, _), n in zip(pads, spatial, strict=True))
    outputs = [np.ascontiguousarray(o[(slice(None), *crop)]) for o in blender.result()]
    if engine.keys is not None:
        return dict(zip(engine.keys, outputs, strict=True))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _image(image: Any) -> np.ndarray:
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise DataError(f"image must be a NumPy array or a tensor, got {type(image).__name__}")
    if image.ndim not in (3, 4):
        raise DataError(
            f"image must be (C, H, W) or (C, D, H, W), channels first without a batch axis; "
            f"got shape {image.shape}"
        )
    if not np.issubdtype(image.dtype, np.number):
        raise DataError(f"image must hold numbers, got dtype {image.dtype}")
    return np.ascontiguousarray(image, dtype=np.float32)


def _roi(roi_size: Sequence[int], spatial: tuple[int, ...]) -> tuple[int, ...]:
    try:
        roi = tuple(int(r) for r in roi_size)
    except TypeError:
        raise DataError(f"roi_size must give one size per spatial axis, got {roi_size!r}") from None
    if len(roi) != len(spatial) or any(r < 1 for r in roi) or any(int(r) != r for r in roi_size):
        raise DataError(
            f"roi_size must give one positive size per spatial axis of the image "
            f"({len(spatial)} for shape {spatial}), got {tuple(roi_size)!r}"
        )
    return roi


def _window(corner: tuple[int, ...], roi: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(c, c + r) for c, r in zip(corner, roi, strict=True))


def _batches(corners: list[tuple[int, ...]], size: int) -> Iterator[list[tuple[int, ...]]]:
    for i in range(0, len(corners), size):
        yield corners[i : i + size]


class _Blender:
    """The weighted sum of window outputs and the sum of weights, per output voxel."""

    def __init__(self, shape: tuple[int, ...], roi: tuple[int, ...], weights: np.ndarray) -> None:
        self.shape, self.roi, self.weights = shape, roi, weights
        self.sums: list[np.ndarray] | None = None
        self.counts = np.zeros(shape, np.float32)
        self.lock = threading.Lock()

    def add(self, outputs: list[np.ndarray], corners: list[tuple[int, ...]]) -> None:
        """Add the outputs of one batch (each ``(>= len(corners), C_k, *roi)``)."""
        with self.lock:
            if self.sums is None:
                for k, out in enumerate(outputs):
                    if tuple(out.shape[2:]) != self.roi:
                        raise DataError(
                            f"output {k} of the model has spatial shape {tuple(out.shape[2:])} for "
                            f"windows of {self.roi}: predict blends outputs of the window's size "
                            "(export a deep-supervision model with its full-resolution head only)"
                        )
                self.sums = [np.zeros((out.shape[1], *self.shape), np.float32) for out in outputs]
            for i, corner in enumerate(corners):
                region = _window(corner, self.roi)
                for total, out in zip(self.sums, outputs, strict=True):
                    total[(slice(None), *region)] += out[i] * self.weights
                self.counts[region] += self.weights

    def result(self) -> list[np.ndarray]:
        assert self.sums is not None, "no window was run"
        return [total / self.counts for total in self.sums]


class _SyncEngine:
    """Runs each batch as it comes (PyTorch, onnxruntime)."""

    def __init__(self, run: Callable[[np.ndarray], list[np.ndarray]], blender: _Blender) -> None:
        self.run, self.blender = run, blender

    @property
    def keys(self) -> list[str] | None:
        """The output names of a PyTorch model that returns a dict."""
        return getattr(self.run, "keys", None)

    def submit(self, windows: np.ndarray, corners: list[tuple[int, ...]]) -> None:
        self.blender.add(self.run(windows), corners)

    def wait(self) -> None:
        pass


class _OpenVINOEngine:
    """Keeps several OpenVINO infer requests in flight.

    Batches are blended in the order they were submitted, whatever order they finish in,
    so the float sums, and the output, are the same on every run. The model is compiled
    for a static batch: a last, short batch is filled with zeros and only its windows are
    blended."""

    keys = None

    def __init__(self, compiled: Any, batch_shape: tuple[int, ...], blender: _Blender) -> None:
        import openvino as ov

        self.batch_shape, self.blender = batch_shape, blender
        self.queue = ov.AsyncInferQueue(compiled)
        self.queue.set_callback(self._done)
        self.submitted = 0
        self.next = 0  # the next batch to blend
        self.finished: dict[int, tuple[list[np.ndarray], list[tuple[int, ...]]]] = {}
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def _done(self, request: Any, userdata: tuple[int, list[tuple[int, ...]]]) -> None:
        index, corners = userdata
        try:
            # the request's output memory is reused by its next batch: keep a copy
            outputs = [np.array(t.data[: len(corners)]) for t in request.output_tensors]
            with self.lock:
                self.finished[index] = (outputs, corners)
                while self.next in self.finished:
                    self.blender.add(*self.finished.pop(self.next))
                    self.next += 1
        except BaseException as exc:  # raised again in wait(): a callback cannot raise
            self.error = self.error or exc

    def submit(self, windows: np.ndarray, corners: list[tuple[int, ...]]) -> None:
        if len(windows) < self.batch_shape[0]:
            full = np.zeros(self.batch_shape, np.float32)
            full[: len(windows)] = windows
            windows = full
        # windows is a new array per batch (np.stack): the request may read it until it is done
        self.queue.start_async({0: windows}, (self.submitted, corners))
        self.submitted += 1

    def wait(self) -> None:
        self.queue.wait_all()
        if self.error is not None:
            raise self.error


def _engine(model: Any, batch_shape: tuple[int, ...], blender: _Blender, threads: int | None):
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ExportError(f"no model file at {str(path)!r}")
        if path.suffix == ".onnx":
            from qseg.runtime.onnxruntime import onnxruntime_session

            try:
                model = onnxruntime_session(path, threads)
            except Exception as exc:
                raise ExportError(f"onnxruntime cannot open {path}: {exc}") from exc
        elif path.suffix == ".xml":
            from qseg.runtime.openvino import compile_openvino

            config = {"PERFORMANCE_HINT": "THROUGHPUT"}
            model = compile_openvino(path, threads=threads, config=config, shapes=[batch_shape])
        else:
            raise ExportError(
                f"predict runs an OpenVINO IR (.xml) or an ONNX file (.onnx), got {path.name!r}"
            )
    kind = type(model).__module__.split(".")[0]
    if kind == "openvino":
        _check_openvino_input(model, batch_shape)
        return _OpenVINOEngine(model, batch_shape, blender)
    if kind == "onnxruntime":
        name = model.get_inputs()[0].name
        return _SyncEngine(lambda windows: model.run(None, {name: windows}), blender)
    import torch

    if isinstance(model, torch.nn.Module):
        return _SyncEngine(_TorchRun(model), blender)
    raise ExportError(
        "model must be an .xml or .onnx path, a compiled OpenVINO model, an onnxruntime "
        f"session or a torch.nn.Module; got {type(model).__name__}"
    )


def _check_openvino_input(compiled: Any, batch_shape: tuple[int, ...]) -> None:
    if len(compiled.inputs) != 1:
        raise ExportError(f"predict feeds one image; the compiled model has {len(compiled.inputs)} inputs")
    import openvino as ov

    shape = compiled.input(0).get_partial_shape()
    if shape.rank.get_length() != len(batch_shape) or not shape.compatible(
        ov.PartialShape(list(batch_shape))
    ):
        raise ExportError(
            f"the compiled model takes inputs of shape {shape}, not the windows' {list(batch_shape)}: "
            f"compile it with compile_openvino(path, shapes=[{batch_shape}]) or pass the path"
        )


class _TorchRun:
    """Runs a batch of windows through a PyTorch module on its device."""

    def __init__(self, module: Any) -> None:
        import torch

        self.module = module.eval()
        self.device = next((p.device for p in module.parameters()), torch.device("cpu"))
        self.keys: list[str] | None = None

    def __call__(self, windows: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(windows).to(self.device))
        if isinstance(out, torch.Tensor):
            outs = [out]
        elif isinstance(out, dict) and all(isinstance(o, torch.Tensor) for o in out.values()):
            self.keys = list(out)
            outs = list(out.values())
        elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            outs = list(out)
        else:
            raise DataError(
                f"the model returned {type(out).__name__}; predict blends a tensor, or a tuple or dict of tensors"
            )
        return [o.detach().float().cpu().numpy() for o in outs]
