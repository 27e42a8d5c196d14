"""Contracts every quantizer keeps: shapes, dtypes, devices, empty and NaN inputs,
``spec()`` agreeing with the forward, and state that round-trips."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from strategies import scaled_tensors

from qseg.quantizers import Binary, DoReFa, FixedPoint, PowerOfTwo, Quantizer, Ternary, TernaryTanh, Uniform


@dataclass(frozen=True)
class Case:
    make: Callable[[], Quantizer]
    # the grid depends on the whole tensor, so one NaN makes every output NaN
    nan_spreads: bool = False
    # the forward output lies on the grid spec() describes
    has_spec: bool = True


def _eval(q: Quantizer) -> Quantizer:
    return q.eval()


def _uniform_preset() -> Uniform:
    q = Uniform(4, mode="asymmetric")
    q.observe_range(torch.tensor(-0.5), torch.tensor(2.0))
    return q


def _power_of_two_fixed() -> PowerOfTwo:
    q = PowerOfTwo(6)
    q.fix_bounds(torch.tensor([0.7]))
    return q


CASES = {
    "fixed_point_q0.4": Case(lambda: FixedPoint(0, 4)),
    "fixed_point_qa6.0_unsigned": Case(lambda: FixedPoint(6, 0, signed=False)),
    "fixed_point_q8.8_identity_ste": Case(lambda: FixedPoint(8, 8, ste="identity")),
    "fixed_point_wrap": Case(lambda: FixedPoint(1, 3, overflow="wrap")),
    "power_of_two": Case(lambda: PowerOfTwo(5), nan_spreads=True, has_spec=False),
    "power_of_two_fixed_bounds": Case(_power_of_two_fixed, has_spec=False),
    "binary": Case(Binary),
    "binary_mean": Case(lambda: Binary(scale="mean"), nan_spreads=True),
    "dorefa_1": Case(lambda: DoReFa(1), nan_spreads=True),
    "dorefa_3": Case(lambda: DoReFa(3), nan_spreads=True),
    "ternary": Case(Ternary, nan_spreads=True),
    "ternary_per_channel": Case(lambda: Ternary(channel_axis=0), nan_spreads=True),
    "ternary_tanh_eval": Case(lambda: _eval(TernaryTanh())),
    # the first forward sets the scale from that tensor's min and max
    "uniform_int8_from_data": Case(lambda: Uniform(8), nan_spreads=True),
    "uniform_asymmetric_preset": Case(_uniform_preset),
    "ternary_tanh_train": Case(TernaryTanh, has_spec=False),
}
NAMES = sorted(CASES)
SPEC_NAMES = [n for n in NAMES if CASES[n].has_spec]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def weight(shape=(6, 3, 3, 3), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.8


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(7,), (6, 5), (6, 3, 3, 3), (6, 2, 2, 3, 3), (1, 1)])
def test_shape_and_dtype_preserved(name, shape):
    q = CASES[name].make()
    x = weight(shape)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        y = q(x.to(dtype))
        assert y.shape == x.shape and y.dtype == dtype


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_equals_float32_then_cast(name, dtype):
    # a half input is quantized as the float32 of the same values, then cast once
    q = CASES[name].make()
    x = weight().to(dtype)
    assert torch.equal(q(x), q(x.float()).to(dtype))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradient_has_the_input_dtype_and_shape(name, dtype):
    q = CASES[name].make()
    x = weight().to(dtype).requires_grad_(True)
    q(x).sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("device", DEVICES)
def test_device_preserved_and_results_match_cpu(name, device):
    q = CASES[name].make()
    x = weight()
    y = q.to(device)(x.to(device))
    assert y.device.type == device
    torch.testing.assert_close(y.cpu(), q.cpu()(x), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(0,), (0, 3, 3, 3), (4, 0)])
def test_empty_tensors(name, shape):
    q = CASES[name].make()
    x = torch.empty(shape, requires_grad=True)
    y = q(x)
    assert y.shape == x.shape
    y.sum().backward()


@pytest.mark.parametrize("name", NAMES)
def test_nan_in_nan_out(name):
    case = CASES[name]
    q = case.make()
    x = weight((12,))
    x[3] = float("nan")
    y = q(x)
    assert torch.isnan(y[3])
    if case.nan_spreads:
        assert torch.isnan(y).all()
    else:
        assert torch.isfinite(torch.cat([y[:3], y[4:]])).all()


@pytest.mark.parametrize("name", SPEC_NAMES)
@given(x=scaled_tensors())
def test_spec_codes_reproduce_the_forward_exactly(name, x):
    q = CASES[name].make()
    for w in (x, weight(seed=x.numel())):
        y = q(w)
        spec = q.spec(w)
        codes = spec.codes(y)
        assert codes.dtype == torch.int64
        assert (codes >= spec.qmin).all() and (codes <= spec.qmax).all()
        assert torch.equal(spec.dequantize(codes).to(y.dtype), y)


def test_per_channel_spec_has_one_scale_per_channel():
    q = Ternary(channel_axis=0)
    w = weight()
    spec = q.spec(w)
    assert spec.axis == 0 and spec.scale.shape == (w.shape[0],)
    assert torch.equal(spec.dequantize(spec.codes(q(w))), q(w))


def test_uniform_and_non_uniform_grids_are_told_apart():
    w = weight()
    assert PowerOfTwo(5).spec(w) is None
    assert FixedPoint(0, 4).spec().scale.item() == 2.0**-4


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips_with_weights_only_load(name):
    q = CASES[name].make()
    if isinstance(q, TernaryTanh):
        q.anneal(0.6)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = CASES[name].make()
    fresh.load_state_dict(state)
    x = weight()
    assert torch.equal(fresh(x), q(x))
    assert {k: v.tolist() for k, v in fresh.state_dict().items()} == {
        k: v.tolist() for k, v in q.state_dict().items()
    }


@pytest.mark.parametrize("name", NAMES)
def test_bits_and_repr(name):
    q = CASES[name].make()
    assert isinstance(q.bits, int) and 1 <= q.bits <= 17
    assert type(q).__name__ in repr(q)


@pytest.mark.parametrize("name", NAMES)
def test_integer_input_is_rejected(name):
    q = CASES[name].make()
    with pytest.raises(ValueError, match="floating-point"):
        q(torch.arange(4))
