"""The models' side of suggestive annotation: uncertainty over a pool, descriptor layers
found in the graph, descriptors, pool formats and errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import qseg
from qseg.active import AnnotationError, descriptor_layer, score_pool, suggest
from qseg.errors import ModelError
from qseg.models import PaperUNet, TwoHeadFCN

WIDTHS = (4, 4, 4, 4)


def unets(k: int, widths: tuple[int, ...] = WIDTHS) -> list[nn.Module]:
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(PaperUNet(widths=widths))
    return models


def pool(n: int = 6, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


class ReversedOrder(nn.Module):
    """Registers its classifier before its body: registration order is not execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 1, 1)
        self.body = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


class Untraceable(nn.Module):
    """Data-dependent control flow: neither torch.fx nor torch.export can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Conv2d(3, 1, 1)
        self.spare = nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.body(x))
        if f.detach().sum().item() > 1e9:  # never taken: the head is what runs
            return self.spare(f)
        return self.head(f)


class NoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True) * self.scale


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 3, 3, padding=1)
        self.out_head = nn.Conv2d(3, 1, 1)
        self.aux_body = nn.Conv2d(3, 5, 1)
        self.aux_head = nn.Conv2d(5, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = torch.relu(self.body(x))
        # the auxiliary head runs last, but the first output is "out"
        return {"out": self.out_head(f), "aux": self.aux_head(torch.relu(self.aux_body(f)))}


class FunctionalHead(nn.Module):
    """A classifier written with F.conv2d on its own weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight)


class WithFunctionalHead(nn.Module):
    def __init__(self, root_weight: bool = False) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 3, 3, padding=1)
        self.head = FunctionalHead()
        self.root_weight = root_weight
        self.weight = nn.Parameter(torch.randn(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.body(x))
        # a functional conv on the root's own parameter has no module whose input a hook could read
        return F.conv2d(f, self.weight) if self.root_weight else self.head(f)


def test_identical_models_have_zero_uncertainty() -> None:
    model = unets(1)[0]
    scores = score_pool([model, copy.deepcopy(model), model], pool())
    assert torch.equal(scores.uncertainty, torch.zeros(6))
    assert torch.equal(score_pool([model, model], pool(), uncertainty="variance").uncertainty, torch.zeros(6))


def test_uncertainty_is_the_std_of_sigmoids_across_models() -> None:
    models = unets(3)
    x = pool(4)
    with torch.no_grad():
        probs = torch.stack([m.eval()(x).sigmoid() for m in models])
    expected = probs.std(dim=0, correction=0).mean(dim=(1, 2, 3))
    scores = score_pool(models, x, batch_size=3)
    assert torch.allclose(scores.uncertainty, expected, atol=1e-7)
    assert (scores.uncertainty > 0).all()
    variance = score_pool(models, x, uncertainty="variance").uncertainty
    assert torch.allclose(variance, probs.var(dim=0, correction=0).mean(dim=(1, 2, 3)), atol=1e-8)


def test_multichannel_logits_use_softmax_and_two_classes_equal_the_foreground() -> None:
    torch.manual_seed(1)
    models = [TwoHeadFCN(in_channels=1, widths=(2, 4, 4), num_classes=2) for _ in range(3)]
    x = pool(3)
    with torch.no_grad():
        fg = torch.stack([m.eval()(x)[0].softmax(dim=1)[:, 1] for m in models])
    expected = fg.std(dim=0, correction=0).mean(dim=(1, 2))
    assert torch.allclose(score_pool(models, x).uncertainty, expected, atol=1e-6)


def test_descriptors_are_the_head_inputs_averaged_over_space_and_models() -> None:
    models = unets(3)
    x = pool(5)
    inputs = []
    for m in models:
        seen = []
        handle = m.head.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            m.eval()(x)
        handle.remove()
        inputs.append(seen[0].mean(dim=(2, 3)))
    scores = score_pool(models, x, batch_size=2)
    assert scores.layers == ["head"] * 3
    assert scores.descriptors.shape == (5, WIDTHS[0])
    assert torch.allclose(scores.descriptors, torch.stack(inputs).mean(dim=0), atol=1e-6)


def test_scoring_restores_the_training_mode_and_removes_the_hooks() -> None:
    models = unets(2)
    models[1].eval()
    score_pool(models, pool(2))
    assert models[0].training and not models[1].training
    assert not models[0].head._forward_pre_hooks


@pytest.mark.parametrize(
    ("model", "example", "expected"),
    [
        (PaperUNet(widths=WIDTHS), torch.rand(1, 1, 16, 16), "head"),
        (TwoHeadFCN(widths=(2, 2, 2)), torch.rand(1, 3, 16, 16), "object_head.classifier"),
        (ReversedOrder(), torch.rand(1, 1, 8, 8), "head"),  # the graph, not registration order
        (DictOutput(), torch.rand(1, 1, 8, 8), "out_head"),  # the head of the first output
        (Untraceable(), torch.rand(1, 1, 8, 8), "spare"),  # no graph: last conv in named_modules
        (WithFunctionalHead(), torch.rand(1, 1, 8, 8), "head"),  # the functional conv's weight owner
        (WithFunctionalHead(root_weight=True), torch.rand(1, 1, 8, 8), "body"),  # no owner: fallback
    ],
)
def test_descriptor_layer_is_found_in_the_graph(
    model: nn.Module, example: torch.Tensor, expected: str
) -> None:
    assert descriptor_layer(model, example) == expected


def calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics set to those of ``x``: an untrained model's eval-mode
    BN would pass tiny conv outputs, which the 6-bit activation grid rounds to 0."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(x)
    return model


def test_descriptor_layer_of_a_prepared_model_is_its_float_head() -> None:
    x = pool(2)
    first, second = unets(2)
    qmodel = calibrated(qseg.prepare(first, example_inputs=x[:1]), x)
    assert descriptor_layer(qmodel, x[:1]) == "head"
    other = calibrated(qseg.prepare(second, example_inputs=x[:1]), x)
    scores = score_pool([qmodel, other], x)
    assert scores.descriptors.shape == (2, WIDTHS[0])
    assert (scores.descriptors.abs().sum(dim=1) > 0).all()
    assert (scores.uncertainty > 0).all()


def test_quantized_and_float_models_mix_in_one_ensemble() -> None:
    x = pool(4)
    float_model = unets(1)[0]
    qmodel = qseg.prepare(float_model, example_inputs=x[:1])
    s = suggest([float_model, qmodel], x, k=2, candidates=3)
    assert s.layers == ["head", "head"]
    assert len(s.indices) == 2


def test_a_functional_head_is_hooked_through_its_owning_module() -> None:
    models = [WithFunctionalHead(), WithFunctionalHead()]
    x = pool(3, size=8)
    with torch.no_grad():
        body = torch.stack([torch.relu(m.body(x)).mean(dim=(2, 3)) for m in models]).mean(dim=0)
    scores = score_pool(models, x)
    assert scores.layers == ["head", "head"]
    assert torch.allclose(scores.descriptors, body, atol=1e-6)


def test_layer_argument_names_the_module_whose_input_is_used() -> None:
    models = unets(2)
    scores = score_pool(models, pool(3), layer="dec1.conv2")
    assert scores.layers == ["dec1.conv2", "dec1.conv2"]
    assert scores.descriptors.shape == (3, WIDTHS[0])


def test_every_pool_format_gives_the_same_scores() -> None:
    models = unets(2)
    x = pool(5)
    masks = (x > 0.5).float()
    reference = score_pool(models, x, batch_size=2)
    formats = [
        list(x),  # images (C, H, W)
        [x[:2], x[2:]],  # blocks (n, C, H, W)
        TensorDataset(x, masks),  # (image, mask) items
        iter(list(x)),  # a bare iterable
    ]
    for fmt in formats:
        got = score_pool(models, fmt, batch_size=2)
        assert torch.allclose(got.uncertainty, reference.uncertainty, atol=1e-7)
        assert torch.allclose(got.descriptors, reference.descriptors, atol=1e-6)


def test_images_of_different_sizes_are_scored_one_size_at_a_time() -> None:
    models = unets(2)
    small, large = pool(2, size=16), pool(2, size=24, seed=1)
    mixed = score_pool(models, [small[0], large[0], large[1], small[1]], batch_size=4)
    alone = score_pool(models, torch.stack([small[0]])), score_pool(models, large)
    assert torch.allclose(mixed.uncertainty[:3], torch.cat([alone[0].uncertainty, alone[1].uncertainty]))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: score_pool(unets(1), pool()), AnnotationError, "at least 2"),
        (lambda: score_pool([unets(1)[0], "model"], pool()), AnnotationError, "at least 2 nn.Modules"),
        (lambda: score_pool(unets(2), pool(0)), AnnotationError, "the pool is empty"),
        (lambda: score_pool(unets(2), torch.rand(3, 16, 16)), AnnotationError, r"\(N, C, H, W\)"),
        (lambda: score_pool(unets(2), [torch.rand(16, 16)]), AnnotationError, "pool items must be"),
        (lambda: score_pool(unets(2), pool(), uncertainty="entropy"), AnnotationError, "'std' or 'variance'"),
        (lambda: suggest(unets(2), pool(), k=0), AnnotationError, "k must be"),
        (lambda: suggest(unets(2), pool(), universe="everything"), AnnotationError, "universe"),
        (lambda: score_pool([NoConv(), NoConv()], pool()), ModelError, "NoConv has no convolution"),
        (lambda: score_pool(unets(2), pool(), layer="nope"), ModelError, "no module named 'nope'"),
        (lambda: score_pool([Untraceable(), Untraceable()], pool(), layer="spare"), ModelError, "not called"),
        (lambda: score_pool([*unets(1), *unets(1, (2, 4, 4, 4))], pool()), ModelError, "descriptor size"),
    ],
)
def test_errors_name_what_to_fix(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_a_model_returning_nan_is_reported() -> None:
    models = unets(2)
    with torch.no_grad():
        models[0].head.bias.fill_(float("nan"))
    with pytest.raises(ModelError, match="non-finite"):
        suggest(models, pool())


def test_a_model_returning_no_tensor_is_reported() -> None:
    class Words(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x: torch.Tensor) -> str:
            self.conv(x)
            return "logits"

    with pytest.raises(ModelError, match="Words returned str"):
        score_pool([Words(), Words()], pool(), layer="conv")
