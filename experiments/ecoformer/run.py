"""Train the arms of digits.py for several seeds with one loop; print Markdown tables.

    .venv/bin/python experiments/ecoformer/run.py --seeds 0 1 \
        [--arms softmax ecoformer ecoformer_unfitted finetune] [--steps N]

This script predates the trainer's support for model state (the trainer now
trains every arm but ``finetune``, see digits.py); it has its own loop, built
from the library's parts (the data pipeline, the task's loss, the optimiser and
schedule of the config), the same for every arm:

* a jitted train step (forward with ``{"params", "hashing"}``, backward,
  AdamW update; the hash functions are inputs, not trained);
* for the EcoFormer arms, a jitted refit at the steps the config asks
  (``model_state.hashing.at_start``, ``.every_steps``): the model runs on the
  first ``model_state.hashing.examples`` images of the batch with ``train=False``,
  every layer sows its unit queries, and
  :func:`effformer.mixers.ecoformer.refit_hashing` fits every layer's hash
  functions by KSH. Logged: each fit's agreement of the codes with the KSH labels
  (:func:`~effformer.mixers.ecoformer.hash_agreement`, mean over layers and
  heads) before and after;
* evaluation over the whole test split.

The ``finetune`` arm starts from the ``softmax`` arm's parameters of the same seed
(run it in the same call, listed first). Its table also gives the test accuracy
of the converted model before any fine-tuning, with the random hash functions
``init`` made and with the KSH-fitted ones.

Columns: parameters, test accuracy (mean ± sample std over seeds, and each seed),
median seconds per train step (steps 5 onwards, refits excluded), median
seconds per refit (after the first, which compiles), agreement before -> after at
the first and the last fit (mean over seeds).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effformer import models
from effformer.data import create_input_pipeline, get_dataset_info
from effformer.mixers.ecoformer import HASHING, hashing_agreement, refit_hashing
from effformer.train.optim import create_optimizer
from effformer.train.tasks import create_task


def _configs():
    path = Path(__file__).with_name("digits.py")
    spec = importlib.util.spec_from_file_location("ecoformer_experiments_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(arm: str):
    return _configs().get_config(arm)


class Arm:
    """The model, task and data of one config, and its jitted steps."""

    def __init__(self, config):
        self.config = config
        self.info = get_dataset_info(config.data)
        self.task = create_task(config.task, self.info)
        self.model = models.create(
            config.model.name, **config.model.kwargs.to_dict(), **self.task.model_overrides()
        )
        steps_per_epoch = self.info.splits[self.info.train_split] / config.global_batch_size
        self.num_steps = int(config.num_train_steps) or math.ceil(
            config.num_epochs * steps_per_epoch
        )
        self.tx, _ = create_optimizer(config.optimizer, self.num_steps)
        self.fit = config.model_state.hashing.to_dict()
        self.train_step = jax.jit(self._train_step)
        self.refit = jax.jit(self._refit)
        self.eval_step = jax.jit(self._eval_step)

    def variables(self, params, hashing) -> dict:
        return {"params": params} if hashing is None else {"params": params, HASHING: hashing}

    def _train_step(self, params, opt_state, hashing, batch, rng):
        prepare_rng, dropout_rng = jax.random.split(rng)
        batch = self.task.prepare_batch(batch, prepare_rng, train=True)

        def loss_fn(params):
            outputs = self.model.apply(
                self.variables(params, hashing),
                **self.task.model_inputs(batch),
                train=True,
                rngs={"dropout": dropout_rng},
            )
            loss_sum, weight, _ = self.task.loss_and_metrics(outputs, batch)
            return loss_sum / weight

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def _refit(self, params, hashing, inputs, key):
        """New hash functions from ``inputs``; agreement [before, after] (layer/head mean)."""
        _, state = self.model.apply(
            self.variables(params, hashing), inputs=inputs, mutable=["intermediates"]
        )
        fit = {k: self.fit[k] for k in ("top_k", "learning_rate", "momentum", "iterations")}
        fitted = refit_hashing(key, hashing, state["intermediates"], **fit)
        agreement = [
            hashing_agreement(functions, state["intermediates"], top_k=self.fit["top_k"])
            for functions in (hashing, fitted)
        ]
        return fitted, jnp.stack(agreement)

    def _eval_step(self, params, hashing, batch):
        batch = self.task.prepare_batch(batch, jax.random.PRNGKey(0), train=False)
        outputs = self.model.apply(
            self.variables(params, hashing), **self.task.model_inputs(batch), train=False
        )
        return self.task.loss_and_metrics(outputs, batch)[2]

    def evaluate(self, params, hashing) -> float:
        pipeline = create_input_pipeline(
            self.config.data,
            split=self.info.eval_split,
            global_batch_size=self.config.global_batch_size,
            train=False,
            seed=self.config.seed,
        )
        correct = total = 0.0
        for batch in pipeline:
            total_correct, count = self.eval_step(params, hashing, batch)["accuracy"]
            correct, total = correct + float(total_correct), total + float(count)
        return correct / total


def to_ecoformer(softmax_params: dict) -> dict:
    """Carry a softmax CCT's parameters into the EcoFormer model: q/k from the query
    projection (the official ``to_qk = qkv[:dim]``), value and output unchanged, the
    key projection dropped."""
    params = jax.tree.map(lambda a: a, softmax_params)
    for name, block in params.items():
        if name.startswith("block_"):
            mixer = block["mixer"]
            block["mixer"] = {"qk": mixer["query"], "value": mixer["value"], "out": mixer["out"]}
    return params


def train(arm: Arm, seed: int, params=None, steps: int | None = None) -> dict:
    config, fit = arm.config, arm.fit
    init = jax.jit(
        lambda key: arm.model.init({"params": key, "dropout": key}, **arm.model.dummy_inputs(1))
    )
    variables = init(jax.random.key(seed))
    hashing = variables.get(HASHING)
    fine_tuning = params is not None
    if params is None:
        params = variables["params"]
    elif jax.tree.structure(params) != jax.tree.structure(variables["params"]):
        raise ValueError("run.py: the starting parameters do not fit the model.")
    record = dict(
        params_count=sum(x.size for x in jax.tree.leaves(variables["params"])), agreements=[]
    )
    num_steps = steps or arm.num_steps
    opt_state = arm.tx.init(params)
    pipeline = create_input_pipeline(
        config.data,
        split=arm.info.train_split,
        global_batch_size=config.global_batch_size,
        train=True,
        seed=seed,
    )
    rng = jax.random.key(seed + 1000)
    step_times, refit_times = [], []
    for step in range(num_steps):
        batch = next(pipeline)
        refit_now = hashing is not None and (
            (step == 0 and fit["at_start"])
            or (fit["every_steps"] and step > 0 and step % fit["every_steps"] == 0)
        )
        if refit_now:
            if step == 0 and fine_tuning:
                record["accuracy_before_fit"] = arm.evaluate(params, hashing)
            start = time.perf_counter()
            hashing, agreement = arm.refit(
                params,
                hashing,
                jnp.asarray(batch["inputs"][: fit["examples"]]),
                jax.random.fold_in(jax.random.fold_in(rng, 1 << 30), step),
            )
            agreement = np.asarray(agreement)
            refit_times.append(time.perf_counter() - start)
            record["agreements"].append(agreement)
            if step == 0 and fine_tuning:
                record["accuracy_after_fit"] = arm.evaluate(params, hashing)
            print(
                f"  {config.arm} seed {seed} step {step}: refit, agreement "
                f"{agreement[0]:.3f} -> {agreement[1]:.3f}",
                flush=True,
            )
        start = time.perf_counter()
        params, opt_state, loss = arm.train_step(
            params, opt_state, hashing, batch, jax.random.fold_in(rng, step)
        )
        loss = float(loss)
        step_times.append(time.perf_counter() - start)
        if not np.isfinite(loss):
            raise FloatingPointError(f"{config.arm} seed {seed}: loss {loss} at step {step}.")
        if step % config.log_every_steps == 0 or step == num_steps - 1:
            print(f"  {config.arm} seed {seed} step {step} loss {loss:.4f}", flush=True)
    record.update(
        params=params,
        hashing=hashing,
        accuracy=arm.evaluate(params, hashing),
        step_s=statistics.median(step_times[5:] or step_times),
        refit_s=statistics.median(refit_times[1:]) if len(refit_times) > 1 else float("nan"),
    )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(_configs().ARMS), choices=_configs().ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--steps", type=int, default=None, help="stop every arm after N steps (smoke runs)"
    )
    args = parser.parse_args()
    if "finetune" in args.arms and "softmax" not in args.arms[: args.arms.index("finetune")]:
        parser.error("--arms: finetune starts from the softmax arm; list softmax before it.")
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; load {_loadavg()}", flush=True)
    results: dict[str, list[dict]] = {}
    for arm_name in args.arms:
        arm = Arm(load_config(arm_name))
        for seed in args.seeds:
            start = None
            if arm_name == "finetune":
                start = to_ecoformer(results["softmax"][args.seeds.index(seed)]["params"])
            print(f"{arm_name} seed {seed}: {arm.num_steps} steps", flush=True)
            record = train(arm, seed, params=start, steps=args.steps)
            print(f"{arm_name} seed {seed}: test accuracy {100 * record['accuracy']:.2f}%")
            results.setdefault(arm_name, []).append(record)
    print(f"load after: {_loadavg()}\n")
    print(
        "| arm | params | test accuracy % (mean ± std) | per seed | s/step | s/refit | "
        "agreement at the first fit | at the last fit |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | --- | --- |")
    for arm_name, records in results.items():
        accuracies = [100 * r["accuracy"] for r in records]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        cells = []
        for position in (0, -1):
            fits = [r["agreements"][position] for r in records if r["agreements"]]
            cells.append(
                f"{np.mean([f[0] for f in fits]):.2f} -> {np.mean([f[1] for f in fits]):.2f}"
                if fits
                else "-"
            )
        print(
            f"| {arm_name} | {records[0]['params_count']:,} | {statistics.mean(accuracies):.1f} "
            f"± {spread:.1f} | {', '.join(f'{a:.1f}' for a in accuracies)} | "
            f"{statistics.median(r['step_s'] for r in records):.3f} | "
            f"{statistics.median(r['refit_s'] for r in records):.2f} | {cells[0]} | {cells[1]} |"
        )
    if "finetune" in results:
        print("\n| finetune stage | test accuracy % per seed |")
        print("| --- | --- |")
        rows = (
            ("softmax source (20 epochs)", [r["accuracy"] for r in results["softmax"]]),
            ("converted, random hash functions", "accuracy_before_fit"),
            ("converted, KSH-fitted, not fine-tuned", "accuracy_after_fit"),
            ("fine-tuned (5 epochs)", "accuracy"),
        )
        for label, key in rows:
            values = key if isinstance(key, list) else [r[key] for r in results["finetune"]]
            print(f"| {label} | {', '.join(f'{100 * v:.1f}' for v in values)} |")


def _loadavg() -> str:
    path = Path("/proc/loadavg")
    return path.read_text().strip() if path.exists() else "unavailable"


if __name__ == "__main__":
    models.list_models()
    main()
