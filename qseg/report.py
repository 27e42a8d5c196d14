"""The layer report of a prepared model (``qmodel.qseg_report``): one row per
weighted layer saying how it is quantized or why it stays float, the activation
quantizers and where they stand, and the weight sizes before and after."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["ActRow", "LayerRow", "QsegReport"]


@dataclass(frozen=True)
class LayerRow:
    """One weighted layer.

    ``weights`` is the quantizer label (``Q0.4``) or ``float: <reason>``;
    ``input`` the quantizer on the layer's input where one was placed there;
    ``activation`` the quantizer placed on its output (after its BatchNorm) and
    where; ``bits`` the stored bits per weight (32 in float); ``bytes`` what its
    weights, scales and float32 biases take.

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                       nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> report = qseg.prepare(model, "unet-qa6.0-qw0.4", example_inputs=torch.randn(1, 1, 8, 8)).qseg_report
        >>> row = report.layers[1]
        >>> row.name, row.op, row.weights, row.bits, row.params
        ('3', 'Conv2d', 'Q0.4', 5, 148)
        >>> row.bytes          # 144 weights x 5 bits, 4 float32 biases, 1 float32 scale
        110.0
    """

    name: str
    op: str
    weights: str
    input: str
    activation: str
    params: int
    bits: int
    bytes: float


@dataclass(frozen=True)
class ActRow:
    """One activation quantizer: the node it follows, the quantizer, the rule that
    placed it, the layer it serves and any adjustment made.

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                       nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> report = qseg.prepare(model, "unet-qa6.0-qw0.4", example_inputs=torch.randn(1, 1, 8, 8)).qseg_report
        >>> report.activations[1]
        ActRow(after='4', quantizer='Q6.0 unsigned', rule='after BatchNorm', owner='3', note='')
    """

    after: str
    quantizer: str
    rule: str
    owner: str | None
    note: str = ""


@dataclass
class QsegReport:
    """What ``qseg.prepare`` did to a model, for people (``print(report)``) and
    programs (:meth:`to_dict`).

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                       nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> report = qseg.prepare(model, "unet-qa6.0-qw0.4", example_inputs=torch.randn(1, 1, 8, 8)).qseg_report
        >>> print(report)  # doctest: +ELLIPSIS
        qseg report: recipe 'unet-qa6.0-qw0.4', captured with torch.fx (verified on the example inputs)
        layer  op      weights             input quantizer  output quantizer       params  bits
        -----  ------  ------------------  ---------------  ---------------------  ------  ----
        0      Conv2d  float: first layer  -                Q6.0 unsigned after 1      40    32
        3      Conv2d  Q0.4                -                Q6.0 unsigned after 4     148     5
        6      Conv2d  float: last layer   -                -                           5    32
        1 of 3 weighted layers quantized; weights 0.001 MB float32 -> 0.000 MB (0.376x; biases and scales in float32)
        rescale: weights of 1 layer fitted to their grid per output channel; 1 BatchNorm output scaled by B = 15.16 ...
    """

    recipe: str
    capture: str
    layers: list[LayerRow]
    activations: list[ActRow]
    dropout_removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # what the recipe's `rescale` did, or why not; empty when the recipe did not ask
    rescale: str = ""

    @property
    def float_bytes(self) -> int:
        """Bytes of the weighted layers' parameters in float32."""
        return 4 * sum(row.params for row in self.layers)

    @property
    def quantized_bytes(self) -> float:
        """Bytes of the same parameters as the recipe stores them."""
        return sum(row.bytes for row in self.layers)

    @property
    def quantized_layers(self) -> list[str]:
        """Names of the layers whose weights are quantized, in report order."""
        return [row.name for row in self.layers if not row.weights.startswith("float")]

    def to_dict(self) -> dict:
        """The report as plain lists, dicts, strings and numbers (e.g. for ``json.dumps``),
        with the totals ``float_bytes`` and ``quantized_bytes`` added.

        Example:
            >>> import torch, qseg
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
            ...                       nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
            >>> report = qseg.prepare(model, "unet-qa6.0-qw0.4", example_inputs=torch.randn(1, 1, 8, 8)).qseg_report
            >>> d = report.to_dict()
            >>> [row["name"] for row in d["layers"]], d["float_bytes"], d["quantized_bytes"]
            (['0', '3', '6'], 772, 290.0)
            >>> d["activations"][0]["rule"]
            'after BatchNorm'
        """
        out = asdict(self)
        out["float_bytes"] = self.float_bytes
        out["quantized_bytes"] = self.quantized_bytes
        return out

    def __str__(self) -> str:
        head = ("layer", "op", "weights", "input quantizer", "output quantizer", "params", "bits")
        rows = [
            (r.name, r.op, r.weights, r.input, r.activation, f"{r.params:,}", str(r.bits))
            for r in self.layers
        ]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(
                c.rjust(w) if i >= 5 else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        out = [f"qseg report: recipe {self.recipe!r}, captured with {self.capture}", line(head)]
        out.append(line(tuple("-" * w for w in widths)))
        out.extend(line(row) for row in rows)
        ratio = self.quantized_bytes / self.float_bytes if self.float_bytes else 1.0
        quantized = len(self.quantized_layers)
        out.append(
            f"{quantized} of {len(self.layers)} weighted layers quantized; weights {self.float_bytes / 1e6:.3f} MB "
            f"float32 -> {self.quantized_bytes / 1e6:.3f} MB ({ratio:.3f}x; biases and scales in float32)"
        )
        unowned = [a for a in self.activations if a.owner is None]
        if unowned:
            out.append("activation quantizers serving no single layer:")
            out.extend(f"  after {a.after}: {a.quantizer} ({a.rule})" for a in unowned)
        adjusted = [a for a in self.activations if a.note]
        if adjusted:
            out.append("adjusted activation quantizers:")
            out.extend(f"  after {a.after}: {a.note}" for a in adjusted)
        if self.dropout_removed:
            out.append(f"dropout removed: {', '.join(self.dropout_removed)}")
        if self.rescale:
            out.append(f"rescale: {self.rescale}")
        if self.notes:
            out.append("notes:")
            out.extend(f"  {n}" for n in self.notes)
        return "\n".join(out)
