"""LLM-Shearing: prune to a chosen architecture with learned L0 masks (Xia et al., ICLR 2024).

Targeted structured pruning learns hard-concrete masks (Louizos et al., 2018) over four kinds of
structure, jointly with the model's weights:

* ``layers``: one mask per decoder block; 0 makes the block the identity (its attention and MLP
  outputs are scaled by it), so the block is removed (:mod:`secateurs.model.drop_layers`);
* ``heads``: per block, one mask per KV group (a single head where every head has its own K/V; under
  grouped-query attention the K/V head and the query heads that read it go together, since a group
  cannot be split without breaking GQA); it scales the group's columns of the output projection;
* ``channels``: per block, one mask per MLP channel; it scales the down projection's columns;
* ``hidden``: one mask per residual dimension, shared by all blocks; it scales the embeddings and
  every block's output projections, and the RMSNorms normalise over the dimensions still alive.

The loss is the LM loss plus, for each kind, ``lambda_1 (s - t) + lambda_2 (s - t)^2`` where ``s`` is
the expected fraction pruned under the masks' distributions (per block for heads and channels, then
averaged) and ``t`` the target fraction, ramped linearly from 0 over the first ``lagrangian_warmup``
of the steps; the multipliers are learned by gradient *ascent*, so the constraint is pushed harder
the longer it is missed (the paper's Eq. 2). Paper defaults: mask logits initialised at 5 (masks
almost surely on), clamped to [ln 0.01, ln 100], temperature 2/3, stretch (-0.1, 1.1), mask and
multiplier learning rate 1.0, model learning rate 1e-4, warm-up of the target over 20% of the steps.

At the end each kind keeps exactly the target count of its highest-logit units (the paper's
``eval_target_model``), and the model is sliced physically with the shared surgery of
:mod:`secateurs.model`: hidden dimensions from embeddings, norms and every projection
(:func:`~secateurs.model.slice.slice_hidden`), blocks with
:func:`~secateurs.model.drop_layers.drop_layers`, heads and channels with
:func:`~secateurs.model.slice.apply_widths`. The target shape is the same in every block, so the
config is a plain ``transformers`` config.

The package follows those jobs: :mod:`.target` (the requested shape and its plan), :mod:`.masks`
(hard-concrete masks and multipliers), :mod:`.forward` (the masked forward), :mod:`.slicing` (the
cut), :mod:`.dynamic_batch` (the paper's dynamic batch loading over data domains, and
:func:`~.dynamic_batch.pretrain`, one training phase) and :mod:`.driver` (settings, the training hook,
:func:`shear`). Both phases train through the one loop of :mod:`secateurs.training.loop`.
"""

from .driver import CONTINUE_CHECKPOINT, PRUNE_CHECKPOINT, ShearConfig, ShearReport, ShearTraining, shear
from .forward import MaskedForward
from .masks import ShearMasks
from .slicing import apply_keep, non_embedding_params
from .target import HIDDEN_ARCHS, MASK_KINDS, Plan, ShearTarget, plan_for

__all__ = [
    "CONTINUE_CHECKPOINT", "HIDDEN_ARCHS", "MASK_KINDS", "PRUNE_CHECKPOINT", "MaskedForward", "Plan", "ShearConfig",
    "ShearMasks", "ShearReport", "ShearTarget", "ShearTraining", "apply_keep", "non_embedding_params", "plan_for",
    "shear",
]
