"""Everything built from a config before the first step, shared by train and eval.

:func:`build_experiment` resolves the dataset, task, model, optimizer, mesh and
the shapes and shardings of the train state, all without running the model,
so config errors surface before any compilation.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from effformer import models
from effformer.data import DatasetInfo, get_dataset_info
from effformer.train import sharding
from effformer.train.config import validate_config
from effformer.train.model_state import check_model_collections
from effformer.train.optim import create_optimizer
from effformer.train.state import TrainState
from effformer.train.tasks import CausalLMTask, Task, create_task


@dataclasses.dataclass
class Experiment:
    config: ml_collections.ConfigDict
    info: DatasetInfo
    task: Task
    model: nn.Module
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    mesh: Mesh
    num_train_steps: int
    steps_per_epoch: float
    abstract_state: Any  # TrainState of ShapeDtypeStructs carrying their shardings.
    state_shardings: Any
    init_state: Callable[[], TrainState]
    # Jitted eval steps by their model keyword arguments (effformer.train.evaluate): built
    # once per run, so periodic evaluations do not retrace and recompile. Not an __init__
    # field, so dataclasses.replace (another task or model) starts with an empty cache.
    eval_steps: dict = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def batch_sharding(self) -> NamedSharding:
        return sharding.batch_sharding(self.mesh)


def _check_batch_sizes(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Refuse batch sizes the mesh and the processes cannot split, before any step.

    Each process's pipeline yields batch / process_count examples, and
    ``jax.make_array_from_process_local_data`` needs that share to be exactly what the
    process's devices of the mesh hold: the mesh must give every process the same
    number of devices, and every batch must split over the mesh's devices (which then
    also splits it over the processes). The eval batch is checked here too: it is
    first used at the first evaluation, which may be the end of the run.
    """
    num_devices, processes = mesh.size, jax.process_count()
    per_process = collections.Counter(device.process_index for device in mesh.devices.flat)
    if len(per_process) != processes or len(set(per_process.values())) != 1:
        raise ValueError(
            f"config.mesh: the mesh's {num_devices} devices must be spread equally over the "
            f"{processes} processes (each process feeds 1/{processes} of every batch), got "
            f"{dict(sorted(per_process.items()))} devices by process index; set "
            "config.mesh.num_devices=0 to use every device."
        )
    micro = config.global_batch_size // config.grad_accum_steps
    for name, size in (
        ("global_batch_size / grad_accum_steps", micro),
        (
            "eval batch size (config.eval_batch_size, or global_batch_size if 0)",
            eval_batch_size(config),
        ),
    ):
        if size % num_devices:
            raise ValueError(
                f"config {name} = {size} must be divisible by the {num_devices} devices of the "
                f"mesh; choose a multiple of {num_devices}."
            )


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
    return int(config.eval_batch_size or config.global_batch_size)


def _check_model_takes_granularities(model: nn.Module, config: ml_collections.ConfigDict) -> None:
    """MatFormer training (config.task.matformer_widths) needs a model with nested FFN widths."""
    if not config.task.get("matformer_widths", ()):
        return
    if "ffn_granularities" not in inspect.signature(type(model).__call__).parameters:
        raise ValueError(
            f"config.task.matformer_widths={tuple(config.task.matformer_widths)!r} needs a model "
            "with nested FFN widths (an `ffn_granularities` call argument: the language models "
            f"and the ViT family), got config.model.name={config.model.name!r} "
            f"({type(model).__name__}); set matformer_widths to () or change the model."
        )


def _check_model_packs(model: Any, config: ml_collections.ConfigDict) -> None:
    """Packed data needs a model that keeps packed sequences apart (``supports_packing``):
    Mamba, LMU and Combiner layers read segment ids as padding only, and would silently
    mix the sequences of a row."""
    if config.data.packing and getattr(model, "supports_packing", True) is False:
        raise ValueError(
            f"config.data.packing must be False for config.model.name={config.model.name!r} "
            f"({type(model).__name__}): its layers read segment ids as a padding mask only, "
            "so the sequences packed in a row would mix; give one sequence per row."
        )


def _give_prefix_lm_its_prompt(task: Any, model: Any, config: ml_collections.ConfigDict) -> None:
    """A prefix LM on a causal_lm task attends both ways inside each row's prompt.

    ``CausalLMTask.prompt_is_prefix``: the records' ``prefix_lengths``, else their
    ``prompt_length``. Packed rows hold several sequences and no prompt lengths, and a
    prefix LM takes one prefix per row, so packing is refused.
    """
    if not (isinstance(task, CausalLMTask) and getattr(model, "kind", None) == "prefix_lm"):
        return
    if config.data.packing:
        raise ValueError(
            f"config.data.packing must be False for a prefix LM (config.model.name="
            f"{config.model.name!r}): it takes one prefix per row, and packed rows hold "
            "several sequences."
        )
    task.prompt_is_prefix = True


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    validate_config(config)
    info = get_dataset_info(config.data)
    task = create_task(config.task, info)
    mesh = sharding.create_mesh(config.mesh)
    _check_batch_sizes(config, mesh)

    train_examples = info.splits[info.train_split]
    steps_per_epoch = train_examples / config.global_batch_size
    if config.num_train_steps:
        num_train_steps = int(config.num_train_steps)
    else:
        num_train_steps = max(1, math.ceil(config.num_epochs * steps_per_epoch))

    overrides = {**config.model.kwargs.to_dict(), **task.model_overrides()}
    model = models.create(config.model.name, tiny=config.model.tiny, **overrides)
    _check_model_takes_granularities(model, config)
    _give_prefix_lm_its_prompt(task, model, config)
    _check_model_packs(model, config)
    tx, lr_schedule = create_optimizer(config.optimizer, num_train_steps)
    use_ema = config.ema_decay > 0

    def init_fn(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        variables = model.init({"params": init_rng, "dropout": init_rng}, **model.dummy_inputs(1))
        params = variables["params"]
        model_state = {name: value for name, value in variables.items() if name != "params"}
        check_model_collections(config, set(model_state))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=params if use_ema else None,
            rng=state_rng,
            model_state=model_state,
        )

    rng = jax.random.PRNGKey(config.seed)
    shapes = jax.eval_shape(init_fn, rng)
    shardings = sharding.state_shardings(shapes, mesh)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )

    def init_state() -> TrainState:
        return jax.jit(init_fn, out_shardings=shardings)(rng)

    return Experiment(
        config=config,
        info=info,
        task=task,
        model=model,
        tx=tx,
        lr_schedule=lr_schedule,
        mesh=mesh,
        num_train_steps=num_train_steps,
        steps_per_epoch=steps_per_epoch,
        abstract_state=abstract_state,
        state_shardings=shardings,
        init_state=init_state,
    )


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    return jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
