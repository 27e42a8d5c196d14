"""What inference needs besides the network, recorded inside the exported files.

A model is trained on normalized crops of some size and its logits are read one way; the
exporters write these facts into the ONNX file (``metadata_props``) and the OpenVINO IR
(``rt_info``), so that ``qseg.predict("model.xml", raw_image)`` and ``qseg predict`` need no
other argument.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qseg.errors import ExportError

__all__ = ["METADATA_KEY", "InferenceSettings", "check_settings", "read_settings"]

#: the key of the settings in an ONNX file's metadata_props and an IR's rt_info
METADATA_KEY = "qseg_inference"
_NORMALIZE = ("none", "percentile", "zscore")
_ACTIVATIONS = ("none", "sigmoid", "softmax")


@dataclass(frozen=True)
class InferenceSettings:
    """How to run an exported model on a raw image.

    Args:
        roi_size: the window :func:`qseg.predict` runs (the training crop), one size per
            spatial axis; ``None``: the caller gives it.
        overlap: the fraction of a window its neighbour overlaps.
        blend: ``"gaussian"`` or ``"constant"`` (:func:`qseg.predict`).
        normalize: per-channel scaling of the raw image the model was trained with:
            ``"percentile"`` (1st and 99.8th percentiles to 0 and 1), ``"zscore"`` or ``"none"``.
        activation: what turns the output into scores: ``"none"`` (logits),
            ``"sigmoid"`` or ``"softmax"`` over channels.
        threshold: a one-channel output's foreground is ``score > threshold`` (0 on logits is
            0.5 after a sigmoid); several channels take the argmax.
        class_names: a name per output channel (or per label of the argmax).

    Example:
        >>> s = InferenceSettings(roi_size=(256, 256), normalize="percentile", class_names=("nucleus",))
        >>> InferenceSettings.from_json(s.to_json()) == s
        True
        >>> s.mask(np.array([[[-1.0, 2.0]]])).tolist()  # logits of one channel
        [[0, 1]]
    """

    roi_size: tuple[int, ...] | None = None
    overlap: float = 0.25
    blend: Literal["gaussian", "constant"] = "gaussian"
    normalize: Literal["none", "percentile", "zscore"] = "none"
    activation: Literal["none", "sigmoid", "softmax"] = "none"
    threshold: float = 0.0
    class_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.roi_size is not None:
            roi = tuple(self.roi_size)
            if not roi or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in roi):
                raise ExportError(
                    f"roi_size must be positive integers, one per spatial axis; got {self.roi_size!r}"
                )
            object.__setattr__(self, "roi_size", roi)
        if not isinstance(self.overlap, (int, float)) or not 0 <= self.overlap < 1:
            raise ExportError(f"overlap must be in [0, 1), got {self.overlap!r}")
        if self.blend not in ("gaussian", "constant"):
            raise ExportError(f"blend must be 'gaussian' or 'constant', got {self.blend!r}")
        if self.normalize not in _NORMALIZE:
            raise ExportError(f"normalize must be one of {_NORMALIZE}, got {self.normalize!r}")
        if self.activation not in _ACTIVATIONS:
            raise ExportError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.threshold, (int, float)):
            raise ExportError(f"threshold must be a number, got {self.threshold!r}")
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))

    def to_json(self) -> str:
        """The settings as the JSON string the exporters store.

        Example:
            >>> InferenceSettings(roi_size=(64, 64)).to_json()[:40]
            '{"roi_size": [64, 64], "overlap": 0.25, '
        """
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> InferenceSettings:
        """Settings from :meth:`to_json`'s string.

        Raises:
            ExportError: the text is not such settings (a file written by another tool).

        Example:
            >>> InferenceSettings.from_json('{"roi_size": [16, 64, 64], "normalize": "zscore"}').roi_size
            (16, 64, 64)
        """
        try:
            values = json.loads(text)
            if values.get("roi_size") is not None:
                values["roi_size"] = tuple(values["roi_size"])
            values["class_names"] = tuple(values.get("class_names", ()))
            return cls(**values)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ExportError(
                f"the model's {METADATA_KEY} metadata is not qseg's inference settings: {exc}"
            ) from exc

    def mask(self, output: np.ndarray) -> np.ndarray:
        """The uint8 label map of an output ``(C, *spatial)``: foreground where the score is
        above :attr:`threshold` for one channel, the argmax for several.

        Example:
            >>> InferenceSettings(activation="sigmoid", threshold=0.9).mask(np.array([[[0.0, 3.0]]])).tolist()
            [[0, 1]]
        """
        if output.shape[0] > 1:
            return output.argmax(0).astype(np.uint8)
        score = output[0]
        if self.activation == "sigmoid":
            score = 1 / (1 + np.exp(-score))
        elif self.activation == "softmax":  # of one channel: 1 everywhere
            score = np.ones_like(score)
        return (score > self.threshold).astype(np.uint8)


def read_settings(model: str | os.PathLike | Any) -> InferenceSettings | None:
    """The settings recorded in an exported ``.onnx`` or ``.xml`` file, or in an
    onnxruntime session; ``None`` when there are none (or for another kind of model).

    Raises:
        ExportError: the file cannot be read, or its settings are not qseg's.

    Example:
        >>> import tempfile, torch, qseg
        >>> conv, x = torch.nn.Conv2d(1, 1, 3), torch.rand(1, 1, 8, 8)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = qseg.export_onnx(conv, x, f"{tmp}/c.onnx", inference={"roi_size": (64, 64)})
        ...     read_settings(path).roi_size
        (64, 64)
    """
    text = None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ExportError(f"no model file at {str(path)!r}")
        if path.suffix == ".onnx":
            import onnx

            try:
                proto = onnx.load(str(path), load_external_data=False)
            except Exception as exc:
                raise ExportError(f"cannot read {path}: {exc}") from exc
            text = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
        elif path.suffix == ".xml":
            import openvino as ov

            try:
                ir = ov.Core().read_model(str(path))
            except Exception as exc:
                raise ExportError(f"OpenVINO cannot read {path}: {exc}") from exc
            if ir.has_rt_info([METADATA_KEY]):
                text = ir.get_rt_info([METADATA_KEY]).astype(str)
    elif type(model).__module__.split(".")[0] == "onnxruntime":
        text = model.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    return None if text is None else InferenceSettings.from_json(text)


def check_settings(settings: Any) -> InferenceSettings | None:
    """``settings`` as :class:`InferenceSettings` (a dict of its fields works), or ``None``.

    Example:
        >>> check_settings({"roi_size": [96, 96], "normalize": "percentile"}).roi_size
        (96, 96)
    """
    if settings is None or isinstance(settings, InferenceSettings):
        return settings
    if isinstance(settings, dict):
        try:
            return InferenceSettings(**settings)
        except TypeError as exc:
            raise ExportError(f"inference settings: {exc}") from exc
    raise ExportError(
        f"inference must be InferenceSettings or a dict of its fields, got {type(settings).__name__}"
    )
