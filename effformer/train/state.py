"""The train state: everything a checkpoint must hold to resume bit for bit."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken.
    params: Any
    opt_state: Any
    ema_params: Any  # An EMA of params when config.ema_decay > 0, else None.
    rng: jax.Array  # Raw uint32[2] key; each step's randomness is fold_in(rng, step).
    # The model's variable collections other than "params" (e.g. EcoFormer's "hashing"),
    # {} for most models. Not trained by the optimizer: see effformer.train.model_state.
    model_state: Any
