"""Post-training ranges: ``qseg.calibrate`` runs data through a prepared model and sets
the range of every activation quantizer whose grid comes from data (recipe kind
``int``). A calibrated model converts and exports without training, or starts QAT
from there.

While calibrating, those quantizers pass their input through unchanged, so each
one sees the activations the float model computes up to it (with the weights
quantized, as they will be deployed); the ranges are set once, at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from qseg.bias_correction import BiasCorrection, correct_biases
from qseg.errors import DataError, QuantizerError
from qseg.nn import ActQuant
from qseg.ranges import mse_range, quantile

__all__ = ["CalibratedRange", "CalibrationReport", "calibrate", "calibrated_quantizers"]

Method = Literal["minmax", "percentile", "mse"]
# values kept per quantizer and batch for the percentile and mse methods (a seeded sample)
SAMPLE_PER_BATCH = 65536


@dataclass(frozen=True)
class CalibratedRange:
    """What :func:`calibrate` set on one quantizer: the range its grid covers (``lo``,
    ``hi``), its ``scale`` and ``zero_point``, and the values it saw (``seen_min``,
    ``seen_max``; an unsigned grid after a BatchNorm sees negative values and clamps them).

    Example:
        >>> CalibratedRange("enc1_bn1_act_quant", "uint8", 0.0, 2.55, 0.01, 0, 0.0, 3.1).scale
        0.01
    """

    name: str
    quantizer: str
    lo: float
    hi: float
    scale: float
    zero_point: int
    seen_min: float
    seen_max: float


@dataclass
class CalibrationReport:
    """Every range :func:`calibrate` set, with the method and the data it used.

    Example:
        >>> report = CalibrationReport("minmax", batches=4, samples=16)
        >>> report.ranges.append(CalibratedRange("a", "uint8", 0.0, 2.55, 0.01, 0, 0.0, 2.55))
        >>> print(report)
        calibration: minmax over 4 batches (16 samples), 1 quantizer
        quantizer  grid   range          scale  zero point  seen
        ---------  -----  -------------  -----  ----------  -------------
        a          uint8  [0, 2.55]      0.01   0           [0, 2.55]
    """

    method: str
    batches: int
    samples: int
    ranges: list[CalibratedRange] = field(default_factory=list)
    #: what ``bias_correction=True`` did to each quantized layer (empty without it)
    biases: list[BiasCorrection] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join([self._ranges_table(), *self._bias_lines()])

    def _bias_lines(self) -> list[str]:
        if not self.biases:
            return []
        corrected = [b for b in self.biases if b.skipped is None]
        skipped = [f"{b.name} ({b.skipped})" for b in self.biases if b.skipped is not None]
        largest = max((b.shift_max for b in corrected), default=0.0)
        lines = [f"bias correction: {len(corrected)} layers, largest shift {largest:.3g}"]
        if skipped:
            lines.append("  not corrected: " + ", ".join(skipped))
        return lines

    def _ranges_table(self) -> str:
        count = len(self.ranges)
        head = (
            f"calibration: {self.method} over {self.batches} batches ({self.samples} samples), "
            f"{count} quantizer{'s' if count != 1 else ''}"
        )
        if not self.ranges:
            return head + " (no quantizer of this model takes its range from data)"
        rows = [("quantizer", "grid", "range", "scale", "zero point", "seen")]
        for r in self.ranges:
            rows.append(
                (
                    r.name,
                    r.quantizer,
                    f"[{r.lo:.4g}, {r.hi:.4g}]",
                    f"{r.scale:.4g}",
                    str(r.zero_point),
                    f"[{r.seen_min:.4g}, {r.seen_max:.4g}]",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        widths[2] = widths[5] = max(widths[2], widths[5], 13)
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([head, *lines])


class _Observer(nn.Module):
    """Stands in for a quantizer while calibrating: passes its input through and keeps
    the running min and max, and a sample of the values."""

    def __init__(self, keep_sample: bool, generator: torch.Generator) -> None:
        super().__init__()
        self.lo = float("inf")
        self.hi = float("-inf")
        self.keep_sample = keep_sample
        self.generator = generator
        self.samples: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x.detach().reshape(-1).float()
        if values.numel():
            lo, hi = (float(v) for v in torch.aminmax(values))  # NaN and inf propagate to both
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise DataError("calibration data produced a non-finite activation (NaN or inf)")
            self.lo = min(self.lo, lo)
            self.hi = max(self.hi, hi)
            if self.keep_sample:
                if values.numel() > SAMPLE_PER_BATCH:
                    index = torch.randint(values.numel(), (SAMPLE_PER_BATCH,), generator=self.generator)
                    values = values[index.to(values.device)]
                self.samples.append(values.cpu())
        return x


def _as_args(batch: object) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise DataError(
        f"calibrate takes an iterable of model inputs (tensors, or tuples of tensors), got a "
        f"{type(batch).__name__}; for a loader of (image, mask) pairs pass (x for x, _ in loader)"
    )


def calibrate(
    qmodel: nn.Module,
    data: Iterable,
    method: Method = "minmax",
    batches: int | None = None,
    progress: bool = True,
    percentile: float = 99.99,
    seed: int = 0,
    bias_correction: bool = False,
) -> CalibrationReport:
    """Set the range of every data-dependent activation quantizer of ``qmodel`` from ``data``.

    Args:
        qmodel: a model returned by :func:`qseg.prepare` (FX or fallback), on any device.
        data: an iterable of model inputs: tensors, or tuples of positional inputs (a
            DataLoader of images works; for one of (image, mask) pairs pass
            ``(x for x, _ in loader)``). Each is moved to the model's device.
        method: ``"minmax"`` (the observed min and max), ``"percentile"`` (the
            ``100 - percentile`` and ``percentile`` percentiles: a few outliers do not
            stretch the grid), or ``"mse"`` (the shrink of the observed range whose grid
            quantizes the observed values with the least squared error).
        batches: use at most this many items of ``data`` (default: all).
        progress: a progress bar on stderr.
        percentile: the upper percentile of the ``"percentile"`` method.
        seed: seeds the sample of values the percentile and mse methods keep.
        bias_correction: then run ``data`` a second time, with every quantizer on, and add
            to each quantized layer's bias the mean error its quantized weights make per
            output channel (:mod:`qseg.bias_correction`). ``data`` must be iterable twice
            (a list or a DataLoader, not a generator).

    Returns:
        A :class:`CalibrationReport`, one row per quantizer set.

    Raises:
        DataError: ``data`` yields nothing, something that is not a model input, or
            activations that are not finite; ``bias_correction`` with a one-shot iterator.
        QuantizerError: an unknown ``method`` or a ``percentile`` outside (50, 100].

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                       nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> recipe = {"name": "w8a8", "weights": {"kind": "int", "bits": 8, "channel_axis": 0},
        ...           "activations": {"kind": "int", "bits": 8, "mode": "unsigned"}}
        >>> qmodel = qseg.prepare(model, recipe, example_inputs=torch.randn(1, 1, 16, 16))
        >>> report = qseg.calibrate(qmodel, [torch.randn(2, 1, 16, 16) for _ in range(4)], progress=False)
        >>> [(r.name, r.quantizer, r.lo, r.hi == 255 * r.scale) for r in report.ranges]
        [('_1_act_quant', 'uint8', 0.0, True), ('_4_act_quant', 'uint8', 0.0, True)]
    """
    if method not in ("minmax", "percentile", "mse"):
        raise QuantizerError(f"method must be one of 'minmax', 'percentile', 'mse'; got {method!r}")
    if not 50.0 < percentile <= 100.0:
        raise QuantizerError(f"percentile must be in (50, 100], got {percentile}")
    if bias_correction and iter(data) is data:
        raise DataError(
            "bias_correction runs the data twice: pass a list or a DataLoader, not a generator or iterator"
        )
    targets = calibrated_quantizers(qmodel)
    parameter = next(qmodel.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    observers = {name: _Observer(method != "minmax", generator) for name in targets}
    quantizers = {name: m.quantizer for name, m in targets.items()}
    training = qmodel.training
    report = CalibrationReport(method, 0, 0)
    try:
        for name, module in targets.items():
            module.quantizer = observers[name]  # pass-through while observing
        qmodel.eval()
        items = data if batches is None else _first(data, batches)
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(items, total=batches, desc="calibrate", unit="batch")
        with torch.no_grad():
            for batch in items:
                args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in _as_args(batch))
                qmodel(*args)
                report.batches += 1
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                report.samples += int(first.shape[0]) if first is not None and first.dim() else 1
    finally:
        for name, module in targets.items():
            module.quantizer = quantizers[name]
        qmodel.train(training)
    if report.batches == 0:
        raise DataError("calibrate got no data: pass an iterable that yields at least one model input")
    for name, q in quantizers.items():
        observer = observers[name]
        if observer.lo > observer.hi:  # the quantizer saw no values (a branch the data never reached)
            raise DataError(f"activation quantizer {name} saw no values during calibration")
        lo, hi = observer.lo, observer.hi
        if method == "percentile":
            values = torch.cat(observer.samples)
            lo = quantile(values, (100.0 - percentile) / 100.0)
            hi = quantile(values, percentile / 100.0)
        elif method == "mse":
            lo, hi = mse_range(q, torch.cat(observer.samples), lo, hi)
        q.observe_range(torch.tensor(lo), torch.tensor(hi))
        spec = q.spec(None)  # set now: a calibrated grid needs no tensor
        scale, zero = float(spec.scale), spec.zero_point
        grid = ((spec.qmin - zero) * scale, (spec.qmax - zero) * scale)
        report.ranges.append(CalibratedRange(name, q.label, *grid, scale, zero, observer.lo, observer.hi))
    if bias_correction:
        items = data if batches is None else _first(data, batches)
        inputs = (
            tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in _as_args(b)) for b in items
        )
        report.biases = correct_biases(qmodel, inputs)
    return report


def calibrated_quantizers(qmodel: nn.Module) -> dict[str, ActQuant]:
    """The activation quantizers of ``qmodel`` whose range :func:`calibrate` sets, by name:
    empty for a recipe of fixed grids only (which needs no calibration).

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> x = torch.randn(1, 1, 8, 8)
        >>> list(calibrated_quantizers(qseg.prepare(model, "int8", example_inputs=x)))
        ['_1_act_quant', 'input_1_act_quant']
        >>> calibrated_quantizers(qseg.prepare(model, "unet-qa6.0-qw0.4", example_inputs=x))
        {}
    """
    return {
        name: m for name, m in qmodel.named_modules() if isinstance(m, ActQuant) and m.quantizer.calibrated
    }


def _first(data: Iterable, count: int):
    for i, item in enumerate(data):
        if i >= count:
            return
        yield item
