"""The OpenVINO form of a QDQ graph: the same values, in the form the CPU plugin fuses.

The QDQ ONNX file (:func:`qseg.export_onnx`) is written for onnxruntime: every
activation quantizer is ``QuantizeLinear -> integer Clip -> DequantizeLinear``,
the form its QLinearConv fusion needs. OpenVINO turns that Clip into a Convert,
a Clamp and a Convert back that its low-precision passes cannot fuse into the
convolutions (measured: about 12 % of the U-Net's latency). So the IR is
converted from a copy of the ONNX graph rewritten in six exact steps
(:func:`openvino_form`; a quantizer here is ``QuantizeLinear -> integer Clip ->
DequantizeLinear``, or ``QuantizeLinear -> DequantizeLinear`` where its codes use
their whole type, with one scale and zero point):

1. a quantizer after a ``Concat`` moves onto the Concat's inputs that are not on
   its grid already (the skip connection of a U-Net is): quantizing element-wise
   commutes with concatenation;
2. a quantizer whose input already lies on its grid (the output of an identical
   quantizer, through MaxPool, Relu or Concat) is dropped: it is the identity there;
3. on grids whose lowest stored code is the zero point (unsigned activations with
   zero point 0: every built-in fixed-point recipe), the integer Clip moves before
   the QuantizeLinear as a float Clip on ``[(lo - zp) * s, (hi - zp) * s]``:
   rounding is monotone and the bounds lie on the grid, so clamping before or
   after rounding gives the same codes.

4. every ``InstanceNormalization`` and ``GroupNormalization`` reads its input plus
   :data:`NORM_GUARD` (2^-100), which changes no float32 value of magnitude 2^-75 or
   more, but one that step 5 gives codes;
5. a norm whose input is a quantizer's output, read by nothing else (the
   ``quantize_norm_inputs`` placement; also through data-movement ops, as step 6
   leaves a transposed conv's), reads the codes instead: the DequantizeLinear
   gets scale 1 and zero point 0 and the norm's epsilon becomes ``eps / s**2``.
   InstanceNorm and GroupNorm normalize each sample with its own mean and variance, so
   ``norm(s * (q - zp); eps) == norm(q; eps / s**2)`` (up to float rounding of the
   statistics, the one step that is not bit-exact);
6. a quantizer that reads a Reshape, Transpose, Slice, Squeeze, Unsqueeze or Flatten
   moves onto that op's input (when it is the only reader each way): the op then
   moves codes. The phase interleave of a transposed conv (:mod:`qseg.convert.phases`)
   then runs on 8-bit values, and the phase conv writes them.

Steps run in the order 1, 6, 2, 5, 3, 4.

OpenVINO reads each ``Clip -> Q -> DQ`` as a Clamp and one FakeQuantize from 0,
and fuses both into the producing convolution, as it does for NNCF's models.
Other grids (signed codes) keep the integer Clip: OpenVINO would read their
``Q -> DQ`` as a FakeQuantize whose input range starts below 0, and computing
``x - low`` in float32 moves values next to a rounding tie onto it (measured).

Steps 4 and 5 keep OpenVINO from changing a norm. Its low-precision pass moves a
dequantization scale that reaches an MVN (the form both norms take there) to after
it, and normalizes the unscaled integers with the same epsilon: the norm then
computes ``(x - mean) / sqrt(var + eps * s**2)``, in effect eps = 0. It happens where
the last op before the norm is a bare scale: a convolution without bias, a quantized
MaxPool, an addition of two quantized tensors (measured on OpenVINO 2026.4: a norm
whose variance is near eps kept 18 % of its model's outputs within one step, and
nnU-Net's ResidualEncoderUNet, whose shortcut convs have no bias, lost 0.5 % of its
pixels' classes at 4-bit weights). A constant added after the scale stops the move
(the pass folds it into the dequantization as a subtraction, and a norm after one is
left in float); a zero would be removed as a no-op, so the constant is the smallest
power of two that changes nothing a norm could see. Step 5 avoids the move instead of
stopping it: a dequantization of scale 1 and zero point 0 has nothing to move, and the
norm, which then runs on 8-bit input, already has the epsilon of the codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NORM_GUARD", "OpenVINOForm", "openvino_form"]

#: What every norm's input gets added in the OpenVINO form (step 4 above): not zero, so
#: OpenVINO keeps the addition, and below half an ulp of any float32 value of magnitude
#: 2^-75 or more, so those values stay what they are.
NORM_GUARD = 2.0**-100
#: The ONNX norms OpenVINO computes as an MVN (InstanceNormalization directly,
#: GroupNormalization after a reshape to its groups), where step 4 applies.
GUARDED_NORMS = ("InstanceNormalization", "GroupNormalization")


@dataclass(frozen=True)
class OpenVINOForm:
    """What :func:`openvino_form` changed: quantizers moved onto a Concat's inputs,
    quantizers dropped (their input was on their grid), integer Clips moved
    before their QuantizeLinear (grids whose lowest code is the zero point), norms
    that read their input plus :data:`NORM_GUARD`, norms that read a quantizer's codes
    (step 5), and quantizers moved above a data-movement op (step 6).

    Example:
        >>> OpenVINOForm(moved_through_concat=3, dropped=13, clips_moved=17, norms_guarded=0).dropped
        13
    """

    moved_through_concat: int
    dropped: int
    clips_moved: int
    norms_guarded: int
    norms_on_codes: int = 0
    moved_above_data_movement: int = 0


@dataclass(frozen=True)
class _Chain:
    """``QuantizeLinear -> Clip -> DequantizeLinear`` with scalar constant parameters;
    ``clip`` is None where the codes use their whole type (``lo``, ``hi`` its bounds) and
    the exporter wrote no Clip."""

    q: object  # onnx.NodeProto
    clip: object
    dq: object
    scale: float
    zero: int
    lo: int
    hi: int

    def keeps(self, other: tuple[float, int, int, int] | None) -> bool:
        """Whether values on the grid ``other`` pass through this quantizer unchanged."""
        return (
            other is not None
            and (other[0], other[1]) == (self.scale, self.zero)
            and self.lo <= other[2]
            and other[3] <= self.hi
        )


class _QdqGraph:
    """The nodes of an ONNX graph as a Python list (protobuf's repeated fields copy
    on insert), with the maps the rewrite needs; ``commit`` writes them back."""

    def __init__(self, proto) -> None:
        from onnx import numpy_helper

        self.proto = proto
        self.nodes = list(proto.graph.node)
        self.constants = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = numpy_helper.to_array(value)
        self.graph_outputs = {o.name for o in proto.graph.output}
        self.refresh()

    def refresh(self) -> None:
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.users: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.users.setdefault(name, []).append(node)

    def scalar(self, name: str) -> np.ndarray | None:
        value = self.constants.get(name)
        return value.reshape(()) if value is not None and value.size == 1 else None

    def only_user(self, name: str, op_type: str):
        users = self.users.get(name, [])
        if len(users) == 1 and users[0].op_type == op_type and name not in self.graph_outputs:
            return users[0]
        return None

    def chains(self) -> list[_Chain]:
        found = []
        for q in self.nodes:
            if q.op_type != "QuantizeLinear" or len(q.input) < 3:
                continue
            clip = self.only_user(q.output[0], "Clip")
            if clip is None:
                dq = self.only_user(q.output[0], "DequantizeLinear")
            else:
                dq = self.only_user(clip.output[0], "DequantizeLinear") if len(clip.input) == 3 else None
            if dq is None or len(dq.input) < 3:
                continue
            params = [self.scalar(n) for n in (*q.input[1:3], *dq.input[1:3])]
            bounds = [self.scalar(n) for n in clip.input[1:3]] if clip is not None else []
            if any(p is None for p in params + bounds):
                continue
            scale, zero, dq_scale, dq_zero = params
            if scale != dq_scale or zero != dq_zero:
                continue
            codes = np.iinfo(zero.dtype)
            lo, hi = (int(b) for b in bounds) if bounds else (codes.min, codes.max)
            found.append(_Chain(q, clip, dq, float(scale), int(zero), lo, hi))
        return found

    def quantizer_nodes(self, chain: _Chain, x: str, stem: str) -> list:
        """A copy of ``chain``'s nodes reading ``x``, its output named ``stem``."""
        from onnx import helper

        nodes = [helper.make_node("QuantizeLinear", [x, *chain.q.input[1:]], [f"{stem}_q"], name=f"{stem}_q")]
        codes = f"{stem}_q"
        if chain.clip is not None:
            clip = helper.make_node("Clip", [codes, *chain.clip.input[1:]], [f"{stem}_c"], name=f"{stem}_c")
            nodes.append(clip)
            codes = f"{stem}_c"
        nodes.append(helper.make_node("DequantizeLinear", [codes, *chain.dq.input[1:]], [stem], name=stem))
        return nodes

    def grid(self, name: str, by_output: dict[str, _Chain]) -> tuple[float, int, int, int] | None:
        """The grid ``(scale, zero, lo, hi)`` the value ``name`` provably lies on: a
        quantizer's output, through MaxPool (selects values), Relu (maps codes below
        the zero point to it) and Concat (of one grid)."""
        if name in by_output:
            c = by_output[name]
            return (c.scale, c.zero, c.lo, c.hi)
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "MaxPool" and len(node.output) == 1:
            return self.grid(node.input[0], by_output)
        if node.op_type == "Relu":
            below = self.grid(node.input[0], by_output)
            if below is None:
                return None
            scale, zero, lo, hi = below
            return (scale, zero, max(lo, zero), max(hi, zero))  # code zp is the value 0
        if node.op_type == "Concat":
            grids = [self.grid(i, by_output) for i in node.input]
            if any(g is None for g in grids) or len({g[:2] for g in grids}) != 1:
                return None
            return (*grids[0][:2], min(g[2] for g in grids), max(g[3] for g in grids))
        return None

    def bypass(self, chain: _Chain, source: str) -> None:
        """Remove ``chain``; its consumers read ``source`` instead."""
        doomed = {id(n) for n in (chain.q, chain.clip, chain.dq) if n is not None}
        self.nodes = [n for n in self.nodes if id(n) not in doomed]
        for node in self.nodes:
            for i, name in enumerate(node.input):
                if name == chain.dq.output[0]:
                    node.input[i] = source
        self.refresh()

    def commit(self) -> None:
        """Write the nodes back, without the constants nothing reads any more."""
        read = {name for n in self.nodes for name in n.input} | self.graph_outputs
        read |= {i.name for i in self.proto.graph.input}  # an initializer listed as an input stays
        nodes = [n for n in self.nodes if n.op_type != "Constant" or n.output[0] in read]
        del self.proto.graph.node[:]
        self.proto.graph.node.extend(nodes)
        kept = [i for i in self.proto.graph.initializer if i.name in read]
        del self.proto.graph.initializer[:]
        self.proto.graph.initializer.extend(kept)


def _push_one_through_concat(graph: _QdqGraph) -> bool:
    for chain in graph.chains():
        concat = graph.producer.get(chain.q.input[0])
        if (
            concat is None
            or concat.op_type != "Concat"
            or graph.only_user(concat.output[0], "QuantizeLinear") is not chain.q
            or chain.dq.output[0] in graph.graph_outputs
        ):
            continue
        by_output = {c.dq.output[0]: c for c in graph.chains()}
        if chain.keeps(graph.grid(concat.output[0], by_output)):
            continue  # every input on the grid already: the quantizer is dropped later
        added = []
        for k, name in enumerate(concat.input):
            if chain.keeps(graph.grid(name, by_output)):
                continue
            stem = f"{chain.dq.output[0]}__input{k}"
            added += graph.quantizer_nodes(chain, name, stem)
            concat.input[k] = stem
        at = graph.nodes.index(concat)
        graph.nodes[at:at] = added
        graph.bypass(chain, concat.output[0])
        return True
    return False


def _drop_one_redundant(graph: _QdqGraph) -> bool:
    chains = graph.chains()
    by_output = {c.dq.output[0]: c for c in chains}
    for chain in chains:
        source = chain.q.input[0]
        if chain.dq.output[0] not in graph.graph_outputs and chain.keeps(graph.grid(source, by_output)):
            graph.bypass(chain, source)
            return True
    return False


#: Ops that only move, select or relabel their first input's values: a quantizer with one
#: scale and zero point gives the same codes before them as after them.
DATA_MOVEMENT = ("Reshape", "Transpose", "Slice", "Squeeze", "Unsqueeze", "Flatten")


def _push_one_above_data_movement(graph: _QdqGraph) -> bool:
    """Move a quantizer that reads a Reshape / Transpose / Slice... (its only reader, which
    is its input's only reader) onto that op's input: the op then moves codes, not floats.
    A transposed conv computed as phase convs (docs/export.md) ends in such an
    interleave, which OpenVINO then runs on 8-bit values, and the conv writes them."""
    for chain in graph.chains():
        op = graph.producer.get(chain.q.input[0])
        if (
            op is None
            or op.op_type not in DATA_MOVEMENT
            or graph.only_user(op.output[0], "QuantizeLinear") is not chain.q
            or chain.dq.output[0] in graph.graph_outputs
        ):
            continue
        source = op.input[0]
        if (
            source not in graph.producer
            or len(graph.users.get(source, [])) != 1
            or source in graph.graph_outputs
        ):
            continue
        stem = f"{chain.dq.output[0]}__above_{op.name or op.output[0]}"
        at = graph.nodes.index(op)
        graph.nodes[at:at] = graph.quantizer_nodes(chain, source, stem)
        op.input[0] = stem
        graph.bypass(chain, op.output[0])
        return True
    return False


def _clip_before_quantize(graph: _QdqGraph) -> int:
    from onnx import helper, numpy_helper

    moved = 0
    for chain in graph.chains():
        if chain.clip is None:
            continue  # the codes use their whole type: nothing to clamp
        scale = graph.scalar(chain.q.input[1])
        codes = np.iinfo(graph.scalar(chain.q.input[2]).dtype)
        if codes.min != chain.zero:
            # OpenVINO reads Q -> DQ as one FakeQuantize from (min - zp) * s and computes
            # x - low in float: off zero, values next to a rounding tie land on it (measured
            # on signed int8 grids); the integer Clip keeps its exact Convert / Clamp path
            continue
        x = chain.q.input[0]
        stem = chain.dq.output[0]
        added = []
        if (chain.lo, chain.hi) != (codes.min, codes.max):
            bounds = []
            for tag, code in (("min", chain.lo), ("max", chain.hi)):
                value = np.array((code - chain.zero) * chain.scale, dtype=scale.dtype)
                graph.proto.graph.initializer.append(numpy_helper.from_array(value, f"{stem}__clip_{tag}"))
                bounds.append(f"{stem}__clip_{tag}")
            added.append(helper.make_node("Clip", [x, *bounds], [f"{stem}__clipped"], name=f"{stem}__clip"))
            x = f"{stem}__clipped"
        added += [
            helper.make_node("QuantizeLinear", [x, *chain.q.input[1:]], [f"{stem}__q"], name=f"{stem}__q"),
            helper.make_node(
                "DequantizeLinear", [f"{stem}__q", *chain.dq.input[1:]], [stem], name=f"{stem}__dq"
            ),
        ]
        at = graph.nodes.index(chain.q)
        doomed = {id(n) for n in (chain.q, chain.clip, chain.dq) if n is not None}
        graph.nodes[at:at] = added
        graph.nodes = [n for n in graph.nodes if id(n) not in doomed]
        moved += 1
    graph.refresh()
    return moved


def _norms_on_codes(graph: _QdqGraph) -> set[str]:
    """Step 5: a quantizer read only by per-sample norms hands them its codes. Its
    DequantizeLinear gets scale 1 and zero point 0, and each norm's epsilon becomes
    ``eps / s**2``: ``norm(s * (q - zp); eps) == norm(q; eps / s**2)``, since a norm
    over each sample's own statistics ignores a shift of its whole input and a positive
    scale whose square scales epsilon. Returns the norms' output names."""
    from onnx import helper, numpy_helper

    on_codes = set()
    for chain in graph.chains():
        # through ops that only move values (a phase interleave after step 6): every value
        # they pass on is still s * (q - zp)
        name = chain.dq.output[0]
        norms = graph.users.get(name, [])
        while (
            len(norms) == 1
            and norms[0].op_type in DATA_MOVEMENT
            and norms[0].input[0] == name
            and name not in graph.graph_outputs
        ):
            name = norms[0].output[0]
            norms = graph.users.get(name, [])
        if (
            name in graph.graph_outputs
            or not chain.scale > 0
            or not norms
            or any(n.op_type not in GUARDED_NORMS or list(n.input).index(name) != 0 for n in norms)
        ):
            continue
        stem = chain.dq.output[0]
        scale = graph.scalar(chain.q.input[1])
        zero = graph.scalar(chain.q.input[2])
        for tag, value in (("scale", np.array(1, scale.dtype)), ("zero", np.array(0, zero.dtype))):
            graph.proto.graph.initializer.append(numpy_helper.from_array(value, f"{stem}__codes_{tag}"))
        chain.dq.input[1], chain.dq.input[2] = f"{stem}__codes_scale", f"{stem}__codes_zero"
        for norm in norms:
            epsilon = next((a for a in norm.attribute if a.name == "epsilon"), None)
            if epsilon is None:
                epsilon = helper.make_attribute("epsilon", 1e-5)  # the ONNX default of both norms
                norm.attribute.append(epsilon)
            epsilon.f = float(np.float32(epsilon.f) / np.float32(chain.scale) ** 2)
            on_codes.add(norm.output[0])
        graph.refresh()
    return on_codes


def _guard_norms(graph: _QdqGraph, on_codes: set[str]) -> int:
    from onnx import helper, numpy_helper

    guarded = 0
    nodes = []
    for node in graph.nodes:
        if node.op_type in GUARDED_NORMS and node.output[0] not in on_codes:
            if not guarded:
                value = np.array(NORM_GUARD, dtype=np.float32)
                graph.proto.graph.initializer.append(numpy_helper.from_array(value, "qseg_norm_guard"))
            guarded += 1
            name = f"{node.name or node.output[0]}__guarded"
            nodes.append(helper.make_node("Add", [node.input[0], "qseg_norm_guard"], [name], name=name))
            node.input[0] = name
        nodes.append(node)
    graph.nodes = nodes
    graph.refresh()
    return guarded


def openvino_form(proto) -> OpenVINOForm:
    """Rewrite a QDQ ONNX model (an ``onnx.ModelProto``, in place) into the form
    OpenVINO fuses: the same values, fewer and fusable quantizers.

    Each ``QuantizeLinear -> Clip -> DequantizeLinear`` with scalar constant
    scale and zero point is a quantizer on the grid ``scale * ([lo, hi] - zp)``.
    A quantizer after a Concat moves onto the Concat's inputs that are not on its
    grid; a quantizer whose input is already on its grid (the output of one on
    the same or a narrower grid, through MaxPool, Relu or Concat) is dropped; and on
    the remaining ones whose lowest code is the zero point, the integer Clip becomes
    a float Clip before the QuantizeLinear; every InstanceNormalization and
    GroupNormalization reads its input plus :data:`NORM_GUARD`, which keeps
    OpenVINO from normalizing the unscaled integers with an unscaled epsilon, except
    one whose input is a quantizer read by nothing else: it reads the codes with its
    epsilon divided by the squared scale; and a quantizer after a Reshape, Transpose or
    Slice moves above it. Each is exact in ONNX semantics, so onnxruntime computes the
    same outputs from either graph (bit for bit, but for the norms on codes, whose
    statistics round otherwise); it only loses its QLinearConv fusion, which needs the
    integer Clip, so the file :func:`qseg.export_onnx` writes keeps its form.

    Example:
        >>> import onnx
        >>> from onnx import TensorProto, helper
        >>> def const(name, value, dtype):
        ...     return helper.make_tensor(name, dtype, [], [value])
        >>> nodes = [
        ...     helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        ...     helper.make_node("Clip", ["q", "lo", "hi"], ["c"]),
        ...     helper.make_node("DequantizeLinear", ["c", "s", "z"], ["y"]),
        ... ]
        >>> graph = helper.make_graph(
        ...     nodes, "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        ...     [const("s", 0.5, TensorProto.FLOAT), const("z", 0, TensorProto.UINT8),
        ...      const("lo", 0, TensorProto.UINT8), const("hi", 63, TensorProto.UINT8)],
        ... )
        >>> proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        >>> openvino_form(proto).clips_moved
        1
        >>> [n.op_type for n in proto.graph.node]
        ['Clip', 'QuantizeLinear', 'DequantizeLinear']
    """
    graph = _QdqGraph(proto)
    moved = 0
    while _push_one_through_concat(graph):
        moved += 1
    lifted = 0
    while _push_one_above_data_movement(graph):
        lifted += 1
    dropped = 0
    while _drop_one_redundant(graph):
        dropped += 1
    on_codes = _norms_on_codes(graph)
    clips = _clip_before_quantize(graph)
    norms = _guard_norms(graph, on_codes)
    graph.commit()
    return OpenVINOForm(moved, dropped, clips, norms, len(on_codes), lifted)
