"""Compiled train-step memory: end to end vs local learning (one jitted step and sequential).

    nice -n 10 .venv/bin/python experiments/local_learning/memory.py [--batch 256] [--layers 8]

Builds each arm's experiment on digits with a moderate ViT-Lite (1x1 patches: 64
tokens + class token, width 128, 2 heads, MLP ratio 2, ``--layers`` blocks),
compiles its train step for the CPU and prints XLA's ``memory_analysis()`` of the
compiled program: temporaries (activations kept for the backward pass, optimizer
scratch), arguments, outputs, and arguments + outputs - aliased (donated) +
temporaries as the step's footprint. Nothing runs: these are the compiler's
buffer assignments, not measured peaks.

Arms: ``e2e`` (the plain model, the trainer's step); ``kK`` (local learning with K
modules and MLP feature decoders, the trainer's step: one ``jax.grad`` of the sum
of the local losses); ``kK_sequential`` (the same model and loss,
``config.task.local_schedule = "sequential"``: module by module with an
optimization barrier).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from effformer.train import default_config
from effformer.train.experiment import build_experiment
from effformer.train.steps import make_train_step

MiB = 2**20


def _config(num_modules: int, layers: int, batch: int, sequential: bool):
    config = default_config()
    backbone = dict(patch_size=1, num_layers=layers, embed_dim=128, num_heads=2, mlp_ratio=2.0)
    if num_modules == 0:
        config.model.name = "vit_lite_7_4"
        config.model.kwargs = backbone
        config.task.name = "image_classification"
    else:
        config.model.name = "local_learning_vit"
        config.model.kwargs = dict(backbone="vit_lite_7_4", num_modules=num_modules, **backbone)
        config.task.name = "local_learning"
        config.task.local_schedule = "sequential" if sequential else "joint"
    config.data.name = "digits"
    config.global_batch_size = batch
    config.num_train_steps = 1
    config.mesh.data = 1
    return config


def analyse(arm: str, num_modules: int, sequential: bool, layers: int, batch: int) -> dict:
    exp = build_experiment(_config(num_modules, layers, batch, sequential))
    step = make_train_step(exp)
    image = exp.info.input_shape
    sharding = exp.batch_sharding
    batch_spec = {
        "inputs": jax.ShapeDtypeStruct((batch, *image), jnp.float32, sharding=sharding),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding),
    }
    memory = step.lower(exp.abstract_state, batch_spec).compile().memory_analysis()
    params = sum(x.size for x in jax.tree.leaves(exp.abstract_state.params))
    footprint = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return {
        "arm": arm,
        "params": params,
        "temp": memory.temp_size_in_bytes / MiB,
        "argument": memory.argument_size_in_bytes / MiB,
        "output": memory.output_size_in_bytes / MiB,
        "alias": memory.alias_size_in_bytes / MiB,
        "footprint": footprint / MiB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--modules", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    arms = [("e2e", 0, False)]
    for k in args.modules:
        arms += [(f"k{k}", k, False), (f"k{k}_sequential", k, True)]
    print(f"batch {args.batch}, {args.layers} layers, 65 tokens of width 128, float32", flush=True)
    print("| arm | params | temp MiB | arguments MiB | outputs MiB | aliased MiB | footprint MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arm, k, sequential in arms:
        r = analyse(arm, k, sequential, args.layers, args.batch)
        print(
            f"| {r['arm']} | {r['params']:,} | {r['temp']:.1f} | {r['argument']:.1f} | "
            f"{r['output']:.1f} | {r['alias']:.1f} | {r['footprint']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
