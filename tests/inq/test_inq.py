"""The INQ schedule (paper B): monotone masks, portions per layer, frozen weights that
never move, partial forward, checkpoint resume."""

from __future__ import annotations

import io
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import qseg
import qseg.models
from qseg.errors import QuantizerError
from qseg.inq import DEFAULT_PORTIONS, Schedule, frozen_count
from qseg.nn import quantize_module
from qseg.quantizers import FixedPoint, PowerOfTwo
from qseg.quantizers.power_of_two import nearest_exponent
from qseg.recipes import Recipe
from qseg.recipes.recipe import KeepFloat

BITS = 7
INQ7 = Recipe.from_dict(
    {
        "name": "inq7",
        "weights": {"kind": "power_of_two", "bits": BITS},
        "keep_float": {"first": False, "last": False},
    }
)


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 1, 1),
    )


def prepared_tiny() -> nn.Module:
    torch.manual_seed(0)
    return qseg.prepare(tiny_net(), INQ7, example_inputs=(torch.randn(2, 1, 8, 8),))


def linears(shapes: list[tuple[int, int]], seed: int) -> nn.Sequential:
    """Stand-alone quantized layers (no prepare): fast enough for hypothesis."""
    torch.manual_seed(seed)
    return nn.Sequential(*(quantize_module(nn.Linear(i, o), PowerOfTwo(BITS)) for o, i in shapes))


def grid_of(q: PowerOfTwo) -> torch.Tensor:
    n1, n2 = q.bounds()
    powers = torch.tensor([2.0**p for p in range(n2, n1 + 1)])
    return torch.cat([-powers, torch.zeros(1), powers])


def full_quantizer(q: PowerOfTwo) -> PowerOfTwo:
    """A quantizer outside incremental mode with ``q``'s fixed bounds: the grid values."""
    ref = PowerOfTwo(q.bits)
    ref.n1.copy_(q.n1)
    ref.bounds_fixed.fill_(True)
    return ref


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m for n, m in model.named_modules() if isinstance(getattr(m, "weight_quant", None), PowerOfTwo)
    }


def portion_lists():
    """Strictly increasing accumulated portions in (0, 1], the last one 1.0."""
    return st.lists(st.integers(1, 99), max_size=4, unique=True).map(
        lambda ps: [p / 100 for p in sorted(ps)] + [1.0]
    )


layer_shapes = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 7)), min_size=1, max_size=3)


# -- the counting rule ------------------------------------------------------------------------


@given(st.integers(1, 99), st.integers(1, 500))
def test_frozen_count_is_the_smallest_count_reaching_the_portion(percent, numel):
    portion = percent / 100
    k = frozen_count(portion, numel)
    exact = Fraction(percent, 100) * numel
    assert k >= exact > k - 1
    assert frozen_count(1.0, numel) == numel


# -- properties of the schedule ---------------------------------------------------------------


@given(layer_shapes, portion_lists(), st.integers(0, 2**16), st.floats(0.0, 0.5))
def test_masks_grow_portions_reached_largest_first(shapes, portions, seed, noise):
    model = linears(shapes, seed)
    schedule = Schedule(model, portions)
    assert schedule.stage == 0 and not schedule.done
    layers = quantized_layers(model)
    previous = {n: torch.zeros_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
    bounds = {}
    for stage, portion in enumerate(portions, start=1):
        before = {n: m.weight.detach().clone() for n, m in layers.items()}
        assert schedule.advance() == stage == schedule.stage
        for name, m in layers.items():
            q, w = m.weight_quant, m.weight.detach()
            mask, numel = q.frozen, w.numel()
            count = int(mask.sum())
            # monotone, and the portion reached with the fewest weights (ceil)
            assert (mask | previous[name]).equal(mask)
            assert count >= Fraction(repr(portion)) * numel > count - 1
            assert schedule.frozen_fraction()[name] == count / numel
            # bounds fixed from the whole weight at the first stage, then kept
            if stage == 1:
                bounds[name] = (int(nearest_exponent(before[name].abs().max())), q.bounds()[1])
            assert q.bounds() == bounds[name]
            # the new ones are the largest of the float weights, now on the grid
            new = mask & ~previous[name]
            still_float = ~mask
            if new.any() and still_float.any():
                assert before[name][new].abs().min() >= before[name][still_float].abs().max()
            assert torch.equal(w[new], full_quantizer(q)(before[name])[new])
            assert torch.isin(w[mask], grid_of(q)).all()
            assert torch.equal(w[~new], before[name][~new])
            previous[name] = mask.clone()
        # training moves the float weights between stages
        with torch.no_grad():
            for m in layers.values():
                m.weight.add_(noise * torch.randn_like(m.weight) * ~m.weight_quant.frozen)
    assert schedule.done
    for m in layers.values():
        q = m.weight_quant
        assert q.frozen.all() and q.fully_quantized
        assert torch.equal(m.quantized_weight(), m.weight.detach())
        assert torch.equal(full_quantizer(q)(m.weight.detach()), m.weight.detach())


@given(
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(1, 3),
    portion_lists(),
    st.data(),
    st.integers(0, 2**16),
)
def test_forward_of_a_partially_frozen_layer(cin, cout, k, portions, data, seed):
    torch.manual_seed(seed)
    conv = quantize_module(nn.Conv2d(cin, cout, k), PowerOfTwo(BITS))
    schedule = Schedule(nn.Sequential(conv), portions)
    x = torch.randn(2, cin, 5, 5)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias))  # stage 0: float
    for _ in range(data.draw(st.integers(1, len(portions)))):
        schedule.advance()
    with torch.no_grad():  # float weights leave the grid, as in training
        conv.weight.add_(0.01 * torch.randn_like(conv.weight) * ~conv.weight_quant.frozen)
    q = conv.weight_quant
    w = conv.weight.detach()
    expected = torch.where(q.frozen, full_quantizer(q)(w), w)
    used = conv.quantized_weight()
    assert torch.equal(used, expected)
    assert torch.isin(used[q.frozen], grid_of(q)).all()
    assert torch.equal(used[~q.frozen], w[~q.frozen])
    assert torch.equal(conv(x), F.conv2d(x, expected, conv.bias))
    # gradient: zero on frozen entries, the identity elsewhere
    conv.weight.grad = None
    upstream = torch.randn_like(w)
    conv.quantized_weight().backward(upstream)
    assert torch.equal(conv.weight.grad, upstream * ~q.frozen)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen)
        loss = model(x).pow(2).mean() + model(x).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


@given(st.sampled_from(sorted(OPTIMIZERS)), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**16))
def test_frozen_values_never_move_during_training(kind, stages, steps, seed):
    model = nn.Sequential(linears([(5, 6)], seed), nn.ReLU(), linears([(3, 5)], seed + 1))
    schedule = Schedule(model)
    opt = OPTIMIZERS[kind](model.parameters())
    schedule.attach(opt)
    train(model, opt, 2, seed)  # momentum and Adam moments built up before anything freezes
    layers = quantized_layers(model).values()
    for _ in range(stages):
        schedule.advance()
        frozen = [(m, m.weight.detach().clone(), m.weight_quant.frozen.clone()) for m in layers]
        train(model, opt, steps, seed)
        for m, before, mask in frozen:
            assert torch.equal(m.weight.detach()[mask], before[mask])
            assert torch.equal(m.weight.grad[mask], torch.zeros_like(before[mask]))
            if not schedule.done:
                assert not torch.equal(m.weight.detach()[~mask], before[~mask]), "float weights must train"


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_without_the_hooks_the_optimizer_moves_frozen_weights(kind):
    # the control of the test above: zero gradients alone do not hold frozen weights
    model = linears([(5, 6)], 0)
    schedule = Schedule(model)
    opt = OPTIMIZERS[kind](model.parameters())
    hooks = schedule.attach(opt)
    train(model, opt, 2, 0)
    schedule.advance()
    layer = model[0]
    mask, before = layer.weight_quant.frozen.clone(), layer.weight.detach().clone()
    train(model, opt, 2, 1)
    assert torch.equal(layer.weight.detach()[mask], before[mask])
    hooks.remove()
    train(model, opt, 2, 2)
    assert not torch.equal(layer.weight.detach()[mask], before[mask])


# -- the schedule on prepared models ----------------------------------------------------------


def test_without_a_schedule_the_quantizer_quantizes_everything_and_stage_0_is_float():
    torch.manual_seed(0)
    model = tiny_net().eval()
    x = torch.randn(2, 1, 8, 8)
    qmodel = qseg.prepare(model, INQ7, example_inputs=(x,)).eval()
    for m in quantized_layers(qmodel).values():
        assert torch.equal(m.quantized_weight(), PowerOfTwo(BITS)(m.weight.detach()))
        assert m.weight_quant.fully_quantized
    assert not torch.equal(qmodel(x), model(x))
    schedule = Schedule(qmodel)
    assert schedule.stage == 0 and schedule.portions == DEFAULT_PORTIONS
    assert torch.equal(qmodel(x), model(x))
    assert not any(m.weight_quant.fully_quantized for m in quantized_layers(qmodel).values())


def test_float_first_and_last_layers_are_not_scheduled():
    recipe = INQ7.replace(keep_float=KeepFloat(first=True, last=True))
    x = torch.randn(1, 1, 16, 16)
    qmodel = qseg.prepare(qseg.models.PaperUNet(widths=(4, 8, 8, 8)), recipe, example_inputs=(x,))
    schedule = Schedule(qmodel)
    assert "enc1.conv1" not in schedule.layers and "head" not in schedule.layers
    assert len(schedule.layers) == 13 and "dec1.conv2" in schedule.layers


def test_functional_weights_are_scheduled():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.w = nn.Parameter(torch.randn(2, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(torch.relu(self.conv(x)), self.w)

    qmodel = qseg.prepare(Functional(), INQ7, example_inputs=(torch.randn(1, 1, 6, 6),))
    schedule = Schedule(qmodel, [0.5, 1.0])
    assert schedule.layers == ("conv", "w")
    schedule.advance()
    assert schedule.frozen_fraction() == {"conv": 14 / 27, "w": 3 / 6}  # ceil(13.5) of 27
    assert torch.isin(qmodel.w.detach()[qmodel.w_quant.frozen], grid_of(qmodel.w_quant)).all()


def test_resume_from_a_checkpoint_gives_the_same_result():
    torch.manual_seed(0)
    model = tiny_net()
    x = torch.randn(2, 1, 8, 8)
    batches = [torch.randn(4, 1, 8, 8) for _ in range(12)]

    def steps(qmodel, opt, batch_ids):
        for i in batch_ids:
            loss = (qmodel(batches[i]) - 0.5).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def start():
        qmodel = qseg.prepare(model, INQ7, example_inputs=(x,))
        return qmodel, torch.optim.Adam(qmodel.parameters(), lr=0.01, weight_decay=1e-3)

    qmodel, opt = start()
    schedule = Schedule(qmodel)
    schedule.attach(opt)
    steps(qmodel, opt, [0, 1])
    schedule.advance()
    steps(qmodel, opt, [2, 3])
    schedule.advance()
    steps(qmodel, opt, [4])
    buf = io.BytesIO()
    torch.save({"model": qmodel.state_dict(), "opt": opt.state_dict()}, buf)

    def finish(qmodel, opt, schedule):
        steps(qmodel, opt, [5, 6])
        schedule.advance()
        steps(qmodel, opt, [7, 8])
        schedule.advance()
        steps(qmodel, opt, [9])
        assert schedule.done

    finish(qmodel, opt, schedule)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    resumed, opt2 = start()
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    schedule2 = Schedule(resumed)
    assert schedule2.stage == 2
    schedule2.attach(opt2)
    finish(resumed, opt2, schedule2)
    final, again = qmodel.state_dict(), resumed.state_dict()
    assert final.keys() == again.keys()
    assert all(torch.equal(final[k], again[k]) for k in final), [
        k for k in final if not torch.equal(final[k], again[k])
    ]
    assert torch.equal(qmodel(x), resumed(x))


def test_state_dict_carries_masks_and_stage():
    qmodel = prepared_tiny()
    schedule = Schedule(qmodel)
    schedule.advance()
    state = qmodel.state_dict()
    assert {"0.weight_quant.frozen", "0.weight_quant.stage", "0.weight_quant.incremental"} <= state.keys()
    first = qmodel.get_submodule("0")
    assert state["0.weight_quant.frozen"].shape == first.weight.shape
    fresh = PowerOfTwo(BITS)  # no mask yet: it takes the checkpoint's shape
    prefix = "0.weight_quant."
    fresh.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    assert torch.equal(fresh.frozen, first.weight_quant.frozen) and int(fresh.stage) == 1
    assert torch.equal(fresh(first.weight), first.quantized_weight())
    assert "INQ stage 1, 50.0% frozen" in repr(first.weight_quant)


def test_a_finished_schedule_converts_to_the_same_model():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    qmodel = qseg.prepare(qseg.models.PaperUNet(widths=(4, 8, 8, 8)), INQ7, example_inputs=(x,))
    schedule = Schedule(qmodel)
    while not schedule.done:
        schedule.advance()
    assert all(m.weight_quant.fully_quantized for m in quantized_layers(qmodel).values())
    converted = qseg.convert(qmodel)
    assert torch.equal(converted(x), qmodel.eval()(x))


# -- errors -----------------------------------------------------------------------------------


def test_a_model_without_power_of_two_weights_is_refused():
    with pytest.raises(QuantizerError, match="no layer of this model has a PowerOfTwo weight quantizer"):
        Schedule(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(QuantizerError, match="power_of_two"):
        Schedule(nn.Sequential(quantize_module(nn.Conv2d(1, 2, 3), FixedPoint(0, 4))))


def test_advance_past_the_last_stage_is_refused():
    schedule = Schedule(linears([(2, 3)], 0), [0.5, 1.0])
    schedule.advance()
    schedule.advance()
    with pytest.raises(QuantizerError, match="schedule is done"):
        schedule.advance()
    assert schedule.stage == 2


@pytest.mark.parametrize(
    ("portions", "match"),
    [
        ([], "at least one"),
        ([0.5, 0.5, 1.0], "strictly increasing"),
        ([0.75, 0.5, 1.0], "strictly increasing"),
        ([0.0, 1.0], r"\(0, 1\]"),
        ([0.5, 1.5], r"\(0, 1\]"),
        ([0.5, 0.9], "last portion must be 1.0"),
        (["a", 1.0], "sequence of numbers"),
    ],
)
def test_invalid_portions_are_refused(portions, match):
    with pytest.raises(QuantizerError, match=match):
        Schedule(linears([(2, 3)], 0), portions)


def test_resuming_with_other_portions_is_refused():
    model = linears([(4, 4)], 0)
    schedule = Schedule(model, [0.5, 0.75, 1.0])
    schedule.advance()
    with pytest.raises(QuantizerError, match=r"portion 0\.25 asks for 4"):
        Schedule(model, [0.25, 1.0])
    assert Schedule(model, [0.5, 1.0]).stage == 1  # masks agree with these portions too
    schedule.advance()
    with pytest.raises(QuantizerError, match="beyond the 1 stages"):
        Schedule(model, [1.0])


def test_a_partial_checkpoint_or_mixed_stages_are_refused():
    model = linears([(2, 3), (2, 2)], 0)
    Schedule(model[:1])
    with pytest.raises(QuantizerError, match=r"layers \['1'\] hold no INQ state"):
        Schedule(model)
    Schedule(model[1:]).advance()
    with pytest.raises(QuantizerError, match="different INQ stages"):
        Schedule(model)


def test_non_finite_weights_stop_advance_before_any_layer_changes():
    model = linears([(2, 3), (2, 2)], 0)
    schedule = Schedule(model)
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(QuantizerError, match="layer 1: its weight holds NaN"):
        schedule.advance()
    assert schedule.stage == 0 and not model[0].weight_quant.frozen.any()
    assert not model[0].weight_quant.bounds_fixed


def test_shared_weights_and_foreign_optimizers_are_refused():
    a, b = (
        quantize_module(nn.Linear(2, 2), PowerOfTwo(BITS)),
        quantize_module(nn.Linear(2, 2), PowerOfTwo(BITS)),
    )
    b.weight = a.weight
    with pytest.raises(QuantizerError, match="share one weight"):
        Schedule(nn.Sequential(a, b))
    schedule = Schedule(nn.Sequential(a))
    with pytest.raises(QuantizerError, match="updates none of the weights"):
        schedule.attach(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))


def test_freeze_needs_incremental_mode_and_a_matching_mask():
    q = PowerOfTwo(BITS)
    with pytest.raises(QuantizerError, match="begin_incremental"):
        q.freeze(torch.ones(3, dtype=torch.bool))
    q.begin_incremental(torch.ones(3))
    with pytest.raises(QuantizerError, match=r"boolean mask of shape \(3,\)"):
        q.freeze(torch.ones(4, dtype=torch.bool))
    with pytest.raises(QuantizerError, match="INQ mask has shape"):
        q(torch.ones(2))
