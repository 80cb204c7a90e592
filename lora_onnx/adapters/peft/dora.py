"""DoRA's weight norm, ``||W + s * delta||`` per output channel, computed once when the adapter is applied.

PEFT's DoRA output is ``f * (base output without bias + s * B(A(x))) + bias`` with ``f = m / norm``; the
norm does not depend on the input, so the rewritten graph carries it as a constant. This is the one place
the PEFT import reads weight bytes: one weight at a time, memory-mapped, in float32 (as PEFT computes it).
"""

from __future__ import annotations

import numpy as np

from lora_onnx.kinds import kind_of
from lora_onnx.model.load import LoadedModel
from lora_onnx.sites.find import Site


def weight_norm(
    model: LoadedModel,
    site: Site,
    a: np.ndarray,
    b: np.ndarray,
    scale: float,
    shape: tuple[int, ...],
    *,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """PEFT's DoRA norm for ``site`` in the magnitude's ``shape``; ``a`` / ``b`` in lora-onnx storage layouts.

    Dense and embedding weights are viewed as (in, out) (``vocab, dim`` for embeddings), so the norm runs
    over axis 0, PEFT's row norm of ``W + s * B @ A`` in (out, in). Conv weights: the norm runs over every
    axis but the output channel of ``W + s * mm(B.view(-1, r), A.view(r, -1)).reshape(W.shape)``, PEFT's
    exact expression; for a grouped conv with PEFT's dense A that reshape is not the branch's real delta,
    but it is what PEFT's forward divides by, so it is reproduced, not corrected.

    ``weight`` replaces the site's source initializer (same layout): the module's original parameter when
    the exporter folded a BatchNorm into the graph's copy.
    """
    weight = np.asarray(model.array(site.weight.initializer) if weight is None else weight, np.float32)
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    norm = kind_of(site.op).peft_dora_norm(weight, a32, b32, scale, site)
    return norm.astype(np.float32).reshape(shape)
