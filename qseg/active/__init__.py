"""Suggestive annotation (Yang et al. 2017, as used with quantized FCNs by paper B, Xu et al. 2018).

One round: ``K`` models, trained on bootstrap samples of the labelled set, predict every
image of the unlabelled pool. The images they disagree on most are the candidates
``S_c``; from those, a greedy max-cover picks the ``k`` images that best represent the
whole pool, measured by the cosine similarity of image descriptors taken from the
models' own features. The user labels them, they join the labelled set, and the next
round trains new models.

Definitions used throughout (``N`` pool images, ``K`` models):

* probability: ``sigmoid`` of one-channel logits, ``softmax`` over the channels of
  multi-channel logits;
* ``uncertainty(I)``: the mean over pixels (and classes) of the standard deviation across
  the ``K`` models' probabilities (population std, ``correction=0``), or of the variance;
* ``descriptor(I)``: the feature maps the models' last weighted layer consumes, each
  averaged over space, then averaged over the ``K`` models (see :func:`descriptor_layer`);
* ``F(S_a, S_u) = sum over x in S_u of max over y in S_a of sim(x, y)``, ``F(empty) = 0``,
  with ``S_u`` the whole pool by default (``universe="pool"``).

The modules: :mod:`~qseg.active.scoring` (the models over the pool: probabilities,
uncertainty, descriptors), :mod:`~qseg.active.selection` (candidates, similarity, greedy
max-cover, :func:`suggest`), :mod:`~qseg.active.ensemble` (training the ``K`` models, in
parallel with ``torch.distributed``; :func:`qseg.train.fit` does the training) and
:mod:`~qseg.active.loop` (rounds). Every public name is importable from ``qseg.active``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from qseg.active import suggest
    >>> def net(seed):
    ...     torch.manual_seed(seed)
    ...     return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
    >>> pool = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    >>> s = suggest([net(0), net(1), net(2)], pool, k=3, candidates=6)
    >>> len(s.indices), set(s.indices) <= set(s.candidates), s.descriptors.shape
    (3, True, torch.Size([12, 4]))
"""

from qseg.active.ensemble import DEFAULT_TRAINING, default_train, train_ensemble
from qseg.active.loop import AnnotationLoop, Round, annotate_loop
from qseg.active.scoring import (
    PoolScores,
    descriptor_layer,
    foreground_probabilities,
    image_uncertainty,
    score_pool,
)
from qseg.active.selection import (
    Suggestion,
    cosine_similarity,
    coverage,
    greedy_cover,
    select,
    suggest,
    top_uncertain,
)
from qseg.errors import AnnotationError

__all__ = [
    "DEFAULT_TRAINING",
    "AnnotationError",
    "AnnotationLoop",
    "PoolScores",
    "Round",
    "Suggestion",
    "annotate_loop",
    "cosine_similarity",
    "coverage",
    "default_train",
    "descriptor_layer",
    "foreground_probabilities",
    "greedy_cover",
    "image_uncertainty",
    "score_pool",
    "select",
    "suggest",
    "top_uncertain",
    "train_ensemble",
]
