"""Tasks: what a batch holds, what the model is given, and how it is scored.

A task turns a batch (a dict of arrays from the input pipeline) into the
model's keyword arguments, and the model's output into a loss and metrics.
Losses are returned as a SUM with its weight (the number of examples or of
target tokens), so that micro-batches, devices and padded eval batches all
combine exactly: the trainer divides once, at the end.

Metrics are ``name -> (sum, weight)``; the reported value is sum / weight.

To add a task: subclass :class:`Task`, decorate it with :func:`register_task`.

MatFormer (Devvrit et al., 2023): the language-model tasks (``causal_lm``,
``masked_lm``, ``seq2seq``) and the classification tasks
(``image_classification``, ``sequence_classification``, ``distillation``;
MatViT for the vision models) train over FFN granularities when
``config.matformer_widths`` names them (:func:`matformer_granularities`,
:class:`MatFormerTask`). The
model then runs once per granularity on the same batch (its
``ffn_granularities`` argument) and the loss is the SUM of the granularities'
losses: the paper's joint objective with equal weights, and what scenic's
MatViT trainer computes (``loss += loss_fn(...)`` over its ``matvit_dims``).
A mean would divide the gradient by G: Adam's update barely changes, but the
meaning of gradient clipping and of the reported ``loss`` would differ from
the paper's. Metrics are reported per granularity (``ffn_<width>/loss``,
``ffn_<width>/accuracy``) beside the summed ``loss``. :func:`evaluate_ffn_widths`
evaluates a trained model at any widths (Mix'n'Match sub-models). The model
must take ``ffn_granularities`` (``TransformerLM``, ``EncoderDecoderLM``,
``VisionTransformer``; not ``mamba_lm`` nor the other image models), and code that reads one output from ``model_inputs`` (such as
``effformer.train.sequence_eval``) needs the option off.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

Array = jax.Array
Batch = dict[str, Array]
Metrics = dict[str, tuple[Array, Array]]

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def create_task(config: ml_collections.ConfigDict, dataset_info: Any) -> Task:
    """The task named ``config.name`` (``config`` is ``config.task``)."""
    if config.name not in TASKS:
        raise ValueError(f"config.task.name must be one of {sorted(TASKS)}, got {config.name!r}.")
    return TASKS[config.name](config, dataset_info)


class Task:
    """Base class. Subclasses set ``name`` and override what differs."""

    name = ""
    required_keys: tuple[str, ...] = ()

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        self.config = config
        self.info = dataset_info

    def model_overrides(self) -> dict[str, Any]:
        """Arguments for ``effformer.models.create`` that the data decides (class count, sizes)."""
        return {}

    def check_batch(self, batch: Batch) -> None:
        missing = [key for key in self.required_keys if key not in batch]
        if missing:
            raise ValueError(
                f"Task {self.name!r} needs batch keys {list(self.required_keys)}; missing {missing} "
                f"(batch has {sorted(batch)})."
            )

    def prepare_batch(self, batch: Batch, rng: Array, train: bool) -> Batch:
        """On-device preprocessing inside the jitted step (e.g. Mixup); identity by default."""
        return batch

    def model_inputs(self, batch: Batch) -> dict[str, Array]:
        return {"inputs": batch["inputs"]}

    def loss_and_metrics(self, outputs: Array, batch: Batch) -> tuple[Array, Array, Metrics]:
        """(loss sum, loss weight, metrics) for one batch."""
        raise NotImplementedError

    def gradient_fn(self, model: Any, micro_loss: Callable, dtype: Any) -> Callable:
        """How the train step differentiates one micro-batch's loss.

        ``micro_loss(params, model_state, batch, rng, model_kwargs)`` is the
        trainer's loss of one micro-batch, computed in ``dtype``, returning
        ``(loss_sum, (loss_weight, metric_sums, model_state))``. The returned
        function takes the same arguments and returns ``(grads, (loss_weight,
        metric_sums, model_state))``, ``grads`` the gradient of the loss SUM with
        respect to ``params``. The default differentiates ``micro_loss`` whole; a
        task may compute the same gradients another way (local learning's
        module-by-module schedule, which needs less memory).
        """
        del model, dtype
        return jax.grad(micro_loss, has_aux=True)


def config_number(
    config: ml_collections.ConfigDict | None,
    field: str,
    default: float,
    *,
    low: float,
    high: float | None = None,
    integer: bool = False,
    what: str = "",
) -> Any:
    """``config.task.<field>`` (``default`` when the config or the field is absent), checked.

    It must be a number (an int when ``integer``; never a bool) in ``[low, high]``
    (``high=None``: no upper bound); otherwise a ValueError names the field, the
    bounds, ``what`` it is and the value received. Returns a float, or an int.
    """
    value = default if config is None else config.get(field, default)
    expected = numbers.Integral if integer else numbers.Real
    if (
        isinstance(value, bool)
        or not isinstance(value, expected)
        # Written as "not inside" so that NaN, for which every comparison is False, fails.
        or not value >= low
        or (high is not None and not value <= high)
    ):
        kind = "an int" if integer else "a number"
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        note = f" ({what})" if what else ""
        raise ValueError(f"config.task.{field} must be {kind} {bounds}{note}, got {value!r}.")
    return int(value) if integer else float(value)


def config_flag(config: ml_collections.ConfigDict | None, field: str, default: bool) -> bool:
    """``config.task.<field>`` (``default`` when absent), which must be True or False."""
    value = default if config is None else config.get(field, default)
    if not isinstance(value, bool):
        raise ValueError(f"config.task.{field} must be True or False, got {value!r}.")
    return value


def _example_weights(batch: Batch, size: int) -> Array:
    return batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones((size,), jnp.float32)


def smoothed_one_hot(labels: Array, num_classes: int, label_smoothing: float) -> Array:
    """One-hot targets with ``label_smoothing`` mass spread uniformly over all classes."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes


class MatFormerTask(Task):
    """Base of the tasks that train over MatFormer granularities (module docstring).

    Subclasses define :meth:`base_inputs` and :meth:`output_loss` for one model
    output; this class runs them once per granularity when
    ``config.matformer_widths`` is set: the model gets ``ffn_granularities``,
    returns its outputs stacked [G, ...], and the loss is the sum of the
    granularities' losses on the same batch, with metrics per granularity.
    """

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        super().__init__(config, dataset_info)
        self.granularities = matformer_granularities(config)

    def base_inputs(self, batch: Batch) -> dict[str, Array]:
        """The model's arguments for one output."""
        raise NotImplementedError

    def output_loss(self, outputs: Array, batch: Batch) -> tuple[Array, Array, Metrics]:
        """(loss sum, loss weight, metrics) of one model output."""
        raise NotImplementedError

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        inputs: dict[str, Any] = self.base_inputs(batch)
        if self.granularities:
            inputs["ffn_granularities"] = self.granularities
        return inputs

    def loss_and_metrics(self, outputs: Array, batch: Batch) -> tuple[Array, Array, Metrics]:
        """With granularities, outputs are [G, ...] and the loss is the sum of their losses."""
        if not self.granularities:
            return self.output_loss(outputs, batch)
        if outputs.shape[0] != len(self.granularities):
            raise ValueError(
                f"Task {self.name!r}: with {len(self.granularities)} matformer_widths the model "
                f"output must be stacked over them, [G={len(self.granularities)}, ...], got "
                f"shape {tuple(outputs.shape)}."
            )
        total = jnp.zeros((), jnp.float32)
        metrics: Metrics = {}
        for granularity, output in zip(self.granularities, outputs, strict=True):
            # The weight is the same at every granularity: the same batch is scored.
            loss_sum, weight, granularity_metrics = self.output_loss(output, batch)
            total = total + loss_sum
            label = granularity_label(granularity)
            metrics.update(
                {f"{label}/{name}": value for name, value in granularity_metrics.items()}
            )
        metrics["loss"] = (total, weight)
        return total, weight, metrics


@register_task
class ClassificationTask(MatFormerTask):
    """Image or sequence classification: logits [b, classes] against integer labels [b].

    Training targets use label smoothing and, when configured, Mixup/CutMix
    (image inputs only); evaluation uses the plain labels. Over MatFormer
    granularities (:class:`MatFormerTask`) every granularity sees the same
    mixed batch and targets.
    """

    name = "image_classification"
    required_keys = ("inputs", "label")
    # Whether the task trains on Mixup / CutMix batches; the others refuse a mixing alpha.
    mixes_inputs = True

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        super().__init__(config, dataset_info)
        # Outside [0, 1] the targets get negative entries and the loss is no cross-entropy.
        config_number(config, "label_smoothing", 0.0, low=0.0, high=1.0)
        # A negative alpha would read as "off", and a task that does not mix would ignore a
        # positive one: either way the run would train without the mixing asked for.
        for field in ("mixup_alpha", "cutmix_alpha"):
            alpha = config_number(config, field, 0.0, low=0.0, what="0 turns it off")
            if alpha > 0 and not self.mixes_inputs:
                raise ValueError(
                    f"Task {self.name!r} does not mix inputs: config.task.{field} must be 0, "
                    f"got {alpha!r}."
                )
        config_number(config, "mix_switch_prob", 0.5, low=0.0, high=1.0)

    @property
    def num_classes(self) -> int:
        """The number of classes the labels range over (the data's)."""
        return self.info.num_classes

    def model_overrides(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {"num_classes": self.info.num_classes}
        if len(self.info.input_shape) == 3:  # images [H, W, C]
            height, width, channels = self.info.input_shape
            if height != width:
                raise ValueError(
                    f"image_classification expects square images, got {self.info.input_shape}."
                )
            overrides.update(image_size=height, num_channels=channels)
        else:
            length, channels = self.info.input_shape  # signals [L, C]
            overrides.update(seq_len=length, input_dim=channels)
        return overrides

    def _mixing(self) -> bool:
        return self.mixes_inputs and (self.config.mixup_alpha > 0 or self.config.cutmix_alpha > 0)

    def prepare_batch(self, batch: Batch, rng: Array, train: bool) -> Batch:
        num_classes = self.num_classes
        smoothing = self.config.label_smoothing if train else 0.0
        targets = smoothed_one_hot(batch["label"], num_classes, smoothing)
        batch = dict(batch, targets=targets)
        if train and self._mixing():
            from effformer.data.mixup import mix_batch

            inputs, targets = mix_batch(
                rng,
                batch["inputs"],
                targets,
                mixup_alpha=self.config.mixup_alpha,
                cutmix_alpha=self.config.cutmix_alpha,
                switch_prob=self.config.mix_switch_prob,
            )
            batch.update(inputs=inputs, targets=targets)
        return batch

    def base_inputs(self, batch: Batch) -> dict[str, Array]:
        return {"inputs": batch["inputs"]}

    def output_loss(self, outputs: Array, batch: Batch) -> tuple[Array, Array, Metrics]:
        logits = outputs.astype(jnp.float32)
        weights = _example_weights(batch, logits.shape[0])
        losses = optax.softmax_cross_entropy(logits, batch["targets"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        loss_sum, count = jnp.sum(losses * weights), jnp.sum(weights)
        return (
            loss_sum,
            count,
            {"loss": (loss_sum, count), "accuracy": (jnp.sum(correct * weights), count)},
        )


@register_task
class SequenceClassificationTask(ClassificationTask):
    """Classification of sequences [b, L, C] (e.g. MNIST-1D); no Mixup."""

    name = "sequence_classification"
    mixes_inputs = False


@register_task
class DistillationTask(ClassificationTask):
    """Classification trained against a teacher carried by the batch.

    loss = w * T^2 * KL(p_T || softmax(student / T)) + (1 - w) * cross-entropy(student, label)
    with ``w = config.distill_weight`` and ``T = config.distill_temperature``
    (Hinton et al.); the T^2 keeps the soft term's gradient scale independent of T.

    The teacher comes as dense ``teacher_logits`` [b, classes] (p_T =
    softmax(logits / T)), or as TinyViT's sparse top-K probabilities
    ``teacher_topk_values`` and ``teacher_topk_indices`` [b, K] (what the pipeline
    attaches from ``config.data.teacher_store``), which :meth:`prepare_batch` turns
    into dense ``teacher_probs`` p on device
    (:func:`effformer.data.teacher_store.rebuild_teacher_probs`); then p_T is p
    raised to 1/T and renormalised, which equals softmax(logits / T) when p is the
    teacher's whole softmax (and is p itself at T = 1, TinyViT's setting: its loss is
    the soft cross-entropy, KL plus a constant, with w = 1).

    Training batches without a teacher are refused. Evaluation batches carry none
    (the eval pipeline reads no store): the reported ``loss`` is then the student's
    cross-entropy with the labels.
    """

    name = "distillation"
    required_keys = ("inputs", "label")
    mixes_inputs = False  # Mixed inputs would no longer match the stored teacher logits.

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        super().__init__(config, dataset_info)
        # T = 0 would divide the logits by zero (a NaN loss), w outside [0, 1] would
        # give one of the two terms a negative weight: refuse both before training.
        config_number(config, "distill_weight", 1.0, low=0.0, high=1.0)
        temperature = config_number(config, "distill_temperature", 1.0, low=0.0)
        if temperature == 0:
            raise ValueError(
                f"config.task.distill_temperature must be a number > 0, got {temperature!r}."
            )

    def check_batch(self, batch: Batch) -> None:
        super().check_batch(batch)
        sparse = {"teacher_topk_values", "teacher_topk_indices"}
        if "teacher_logits" not in batch and not sparse <= set(batch):
            raise ValueError(
                f"Task {self.name!r} needs the teacher in the batch: 'teacher_logits' [b, classes], "
                f"or 'teacher_topk_values' and 'teacher_topk_indices' [b, K] (set "
                f"config.data.teacher_store); batch has {sorted(batch)}."
            )

    def prepare_batch(self, batch: Batch, rng: Array, train: bool) -> Batch:
        batch = super().prepare_batch(batch, rng, train)
        if "teacher_topk_values" in batch:
            from effformer.data.teacher_store import rebuild_teacher_probs

            batch["teacher_probs"] = rebuild_teacher_probs(
                batch["teacher_topk_values"], batch["teacher_topk_indices"], self.info.num_classes
            )
        elif train:
            self.check_batch(batch)
        return batch

    def _teacher(self, batch: Batch, temperature: float) -> Array | None:
        """p_T [b, classes], or None for a batch without a teacher (evaluation)."""
        if "teacher_logits" in batch:
            return jax.nn.softmax(batch["teacher_logits"].astype(jnp.float32) / temperature)
        if "teacher_probs" not in batch:
            return None
        probs = batch["teacher_probs"].astype(jnp.float32)
        if temperature == 1.0:
            return probs
        return jax.nn.softmax(jnp.log(jnp.clip(probs, 1e-30)) / temperature)

    def output_loss(self, outputs: Array, batch: Batch) -> tuple[Array, Array, Metrics]:
        logits = outputs.astype(jnp.float32)
        temperature = float(self.config.distill_temperature)
        weight = float(self.config.distill_weight)
        weights = _example_weights(batch, logits.shape[0])
        teacher = self._teacher(batch, temperature)
        hard = optax.softmax_cross_entropy(logits, batch["targets"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        count = jnp.sum(weights)
        metrics: Metrics = {"accuracy": (jnp.sum(correct * weights), count)}
        if teacher is None:
            metrics["loss"] = (jnp.sum(hard * weights), count)
            return metrics["loss"][0], count, metrics
        student_log = jax.nn.log_softmax(logits / temperature)
        kl = jnp.sum(teacher * (jnp.log(jnp.clip(teacher, 1e-30)) - student_log), axis=-1)
        losses = weight * temperature**2 * kl + (1.0 - weight) * hard
        metrics["loss"] = (jnp.sum(losses * weights), count)
        metrics["distill_kl"] = (jnp.sum(kl * weights), count)
        return metrics["loss"][0], count, metrics


@register_task
class LMClassificationTask(ClassificationTask):
    """Classification of token sequences by a language model's classifier head.

    Batch: ``inputs`` [b, L] int token ids, ``label`` [b] int; optional
    ``segment_ids`` / ``positions`` (packing). The model is a language model
    with a classifier (``TransformerLM`` with ``num_classes``: logits [b, C]
    from its pooled hidden states), an encoder or a decoder. Token datasets
    describe their vocabulary, not the labels (``digits_pixels``' ``num_classes``
    is its vocabulary), so the class count is ``config.task.num_classes`` and
    the vocabulary is the data's or ``config.task.vocab_size``, as in the
    language-model tasks (:func:`model_vocab_size`). Label smoothing as in
    :class:`ClassificationTask`; no Mixup.
    """

    name = "lm_classification"
    mixes_inputs = False  # Token ids cannot be mixed.

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        super().__init__(config, dataset_info)
        classes = config.get("num_classes", 0) if config is not None else 0
        if isinstance(classes, bool) or not isinstance(classes, numbers.Integral) or classes < 2:
            raise ValueError(
                f"config.task.num_classes must be an int >= 2 (the labels' classes) for task "
                f"{self.name!r}, got {classes!r}."
            )
        self._num_classes = int(classes)
        self.vocab_size = model_vocab_size(config, dataset_info)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def model_overrides(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {"num_classes": self._num_classes}
        if self.vocab_size:
            overrides["vocab_size"] = self.vocab_size
        return overrides

    def base_inputs(self, batch: Batch) -> dict[str, Array]:
        return _sequence_inputs(batch, ("inputs", "segment_ids", "positions"))


def _token_loss(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array, Metrics]:
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    loss_sum, count = jnp.sum(losses * weights), jnp.sum(weights)
    return (
        loss_sum,
        count,
        {"loss": (loss_sum, count), "accuracy": (jnp.sum(correct * weights), count)},
    )


def _sequence_inputs(batch: Batch, keys: tuple[str, ...]) -> dict[str, Array]:
    return {key: batch[key] for key in keys if key in batch}


def _check_width(where: str, width: Any) -> None:
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or width <= 0:
        raise ValueError(
            f"{where} must be a positive int (hidden units) or a float in (0, 1] (a fraction of "
            f"the FFN width), got {width!r}."
        )
    if not isinstance(width, numbers.Integral) and width > 1:
        raise ValueError(
            f"{where}: a float is a fraction of the FFN width, so it must be in (0, 1], got "
            f"{width!r} (give an int for a number of hidden units)."
        )


def _as_granularity(value: Any) -> Any:
    """A width, or per-layer widths as a tuple (config files may hold lists)."""
    return tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def granularity_label(granularity: Any) -> str:
    """The metric-name prefix of a granularity: ``ffn_0.25``, ``ffn_64``, ``ffn_32-64-64``."""
    if isinstance(granularity, Sequence) and not isinstance(granularity, str):
        return "ffn_" + "-".join(f"{width:g}" for width in granularity)
    return f"ffn_{granularity:g}"


def matformer_granularities(config: ml_collections.ConfigDict) -> tuple[Any, ...]:
    """The FFN granularities ``config.matformer_widths`` names (``config`` is ``config.task``).

    ``()`` (the default) trains the model as it is. Otherwise a tuple of
    granularities, each an ``ffn_widths`` value of the model: one width for
    every layer, an int number of hidden units or a float fraction of
    ``ffn_hidden_dim`` (MatFormer's ``{d/2, d, 2d, 4d}`` with a 4d FFN is
    ``(0.125, 0.25, 0.5, 1.0)``), or a tuple of one width per layer. The model
    checks the widths against its FFN width and depth when it runs. A task built
    without a config (``config=None``, as tests do) trains at full width.
    """
    granularities = () if config is None else config.get("matformer_widths", ()) or ()
    if isinstance(granularities, str) or not isinstance(granularities, Sequence):
        raise ValueError(
            "config.task.matformer_widths must be a tuple of granularities (widths, or tuples "
            f"of per-layer widths), got {granularities!r}."
        )
    granularities = tuple(_as_granularity(g) for g in granularities)
    for index, granularity in enumerate(granularities):
        where = f"config.task.matformer_widths[{index}]"
        if isinstance(granularity, tuple):
            if not granularity:
                raise ValueError(f"{where}: per-layer widths must not be empty, got ().")
            for layer, width in enumerate(granularity):
                _check_width(f"{where}[{layer}]", width)
        else:
            _check_width(where, granularity)
    labels = [granularity_label(g) for g in granularities]
    if len(set(labels)) != len(labels):
        raise ValueError(
            f"config.task.matformer_widths names a granularity twice: {granularities!r}."
        )
    return granularities


def model_vocab_size(config: ml_collections.ConfigDict | None, info: Any) -> int | None:
    """The language model's vocabulary: ``config.vocab_size`` when set (> 0), else the data's.

    ``config`` is ``config.task`` (None: the data's). A vocabulary larger than the data's
    leaves room for tokens the data never holds, such as the masked LM's
    ``mask_token_id``; paired runs on the same data (Ettin's MLM encoder and CLM decoder,
    ``experiments/ettin``) set the same value, so that their embeddings have one shape and
    one run can start from the other (``config.init_from``). None: neither gives one.
    """
    data_vocab = getattr(info, "vocab_size", None) or None
    requested = 0 if config is None else config.get("vocab_size", 0) or 0
    if not requested:
        return data_vocab
    if (
        isinstance(requested, bool)
        or not isinstance(requested, numbers.Integral)
        or requested < (data_vocab or 1)
    ):
        raise ValueError(
            f"config.task.vocab_size must be 0 (the data's vocabulary) or an int >= the data's "
            f"vocabulary {data_vocab}, got {requested!r}."
        )
    return int(requested)


class LanguageModelTask(MatFormerTask):
    """Base of the token-level tasks: the vocabulary, MatFormer granularities.

    The model's vocabulary is the data's, or ``config.task.vocab_size`` when set
    (:func:`model_vocab_size`). Subclasses define :meth:`base_inputs` and
    :meth:`output_loss` for one model output (:class:`MatFormerTask`).
    """

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        super().__init__(config, dataset_info)
        self.vocab_size = model_vocab_size(config, dataset_info)

    def model_overrides(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size} if self.vocab_size else {}


def evaluate_ffn_widths(
    exp: Any,
    params: Any,
    ffn_widths: Sequence[Any],
    split: str | None = None,
    model_state: Any = None,
) -> dict[str, dict[str, float]]:
    """Evaluate a trained model at each of ``ffn_widths`` (MatFormer, Mix'n'Match).

    exp: the run's ``Experiment`` (``effformer.train.restore(workdir).experiment``);
    params: its parameters; ffn_widths: the configurations to score, each a
    width for every layer or a tuple of per-layer widths (as in
    ``config.task.matformer_widths``); split: default the eval split. The model
    runs once per configuration on every eval batch.
    Returns ``{label: {metric: value}}`` over the whole split, labels as in the
    metric names (``ffn_32-64``). model_state: the run's variables besides
    ``params``, if its model has some.
    """
    from effformer.train.evaluate import run_evaluation  # evaluate imports this module

    if not isinstance(exp.task, MatFormerTask):
        names = sorted(name for name, cls in TASKS.items() if issubclass(cls, MatFormerTask))
        raise ValueError(
            f"evaluate_ffn_widths: the run's task must be a MatFormer task {names}, got "
            f"{exp.task.name!r}."
        )
    config = ml_collections.ConfigDict(exp.config.task.to_dict())
    config.matformer_widths = tuple(_as_granularity(g) for g in ffn_widths)
    task = type(exp.task)(config, exp.info)
    if not task.granularities:
        raise ValueError("evaluate_ffn_widths: ffn_widths must name at least one configuration.")
    metrics = run_evaluation(dataclasses.replace(exp, task=task), params, split, model_state)
    results: dict[str, dict[str, float]] = {}
    for granularity in task.granularities:
        prefix = granularity_label(granularity) + "/"
        results[prefix[:-1]] = {
            name.removeprefix(prefix): value
            for name, value in metrics.items()
            if name.startswith(prefix)
        }
    return results


@register_task
class CausalLMTask(LanguageModelTask):
    """Next-token prediction: logits [b, L, V] at position t predict ``targets[t]``.

    Batch: ``inputs`` [b, L] int; optional ``targets`` (default: inputs shifted
    left, the last position unscored), ``weights`` [b, L] (0 for padding),
    ``segment_ids`` and ``positions`` for packed sequences, ``prefix_lengths``
    [b] for prefix LMs.
    """

    name = "causal_lm"
    required_keys = ("inputs",)
    # Set by build_experiment when the model is a prefix LM: each row's prefix is then
    # its records' prefix_lengths, else its prompt (``prompt_length``: the prompt and
    # <sep> of the generated tasks, whose answer tokens alone are scored). Without it a
    # prefix LM would silently train causal everywhere, as a decoder.
    prompt_is_prefix: bool = False

    def base_inputs(self, batch: Batch) -> dict[str, Array]:
        # prefix_lengths [b]: a prefix LM attends bidirectionally inside each row's prefix.
        inputs = _sequence_inputs(batch, ("inputs", "segment_ids", "positions", "prefix_lengths"))
        if self.prompt_is_prefix and "prefix_lengths" not in inputs:
            if "prompt_length" not in batch:
                raise ValueError(
                    f"Task {self.name!r}: a prefix LM needs each row's prefix, the batch's "
                    "prefix_lengths or prompt_length [b] (the generated sequence tasks give "
                    f"prompt_length, without packing); the batch has {sorted(batch)}."
                )
            inputs["prefix_lengths"] = batch["prompt_length"]
        return inputs

    def output_loss(self, outputs: Array, batch: Batch) -> tuple[Array, Array, Metrics]:
        if "targets" in batch:
            targets = batch["targets"]
            weights = batch.get("weights", jnp.ones(targets.shape, jnp.float32))
        else:
            inputs = batch["inputs"]
            targets = jnp.pad(inputs[:, 1:], ((0, 0), (0, 1)))
            weights = jnp.ones(inputs.shape, jnp.float32).at[:, -1].set(0.0)
            if "weights" in batch:
                weights = weights * jnp.pad(batch["weights"][:, 1:], ((0, 0), (0, 1)))
            if "segment_ids" in batch:
                # A token does not predict the first token of the next packed sequence,
                # and padding (segment 0) is never a target.
                segments = batch["segment_ids"]
                same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
                weights = weights * jnp.pad(same, ((0, 0), (0, 1)))
        weights = weights.astype(jnp.float32)
        if "mask" in batch:
            weights = weights * batch["mask"][:, None]
        return _token_loss(outputs, targets, weights)


@register_task
class MaskedLMTask(LanguageModelTask):
    """Masked-token prediction (BERT): the corruption is made on device from the step's key.

    Of the non-padding tokens (``inputs != pad_id``; default 0, and a value no
    token has, e.g. -1, when every token is real, as in ``digits_pixels`` where 0
    is a pixel value), ``mask_rate`` are chosen; of those 80% become
    ``mask_token_id``, 10% a random token of the data's vocabulary, 10% stay.
    Only chosen positions are scored. Evaluation corrupts with a fixed key, so
    its score is deterministic. ``mask_token_id`` must lie in the model's
    vocabulary; when the data's has no room for it, ``config.task.vocab_size``
    enlarges the model's (:func:`model_vocab_size`).
    """

    name = "masked_lm"
    required_keys = ("inputs",)

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        super().__init__(config, dataset_info)
        mask_token = config.get("mask_token_id") if config is not None else None
        if mask_token is None or (self.vocab_size and not 0 <= mask_token < self.vocab_size):
            raise ValueError(
                f"config.task.mask_token_id must be a token id in [0, {self.vocab_size}) (the "
                f"model's vocabulary; config.task.vocab_size enlarges it), got {mask_token!r}."
            )
        # At 0 no position is chosen and every batch scores nothing (loss 0, weight 0).
        rate = config_number(config, "mask_rate", 0.15, low=0.0, high=1.0)
        if rate == 0:
            raise ValueError(f"config.task.mask_rate must be in (0, 1], got {rate!r}.")

    def prepare_batch(self, batch: Batch, rng: Array, train: bool) -> Batch:
        cfg = self.config
        tokens = batch["inputs"]
        if not train:
            rng = jax.random.PRNGKey(0)
        choose_rng, kind_rng, token_rng = jax.random.split(rng, 3)
        real = tokens != cfg.get("pad_id", 0)
        chosen = (jax.random.uniform(choose_rng, tokens.shape) < cfg.get("mask_rate", 0.15)) & real
        kind = jax.random.uniform(kind_rng, tokens.shape)
        random_tokens = jax.random.randint(token_rng, tokens.shape, 0, self.info.vocab_size)
        corrupted = jnp.where(chosen & (kind < 0.8), cfg.mask_token_id, tokens)
        corrupted = jnp.where(chosen & (kind >= 0.8) & (kind < 0.9), random_tokens, corrupted)
        return dict(batch, inputs=corrupted, targets=tokens, weights=chosen.astype(jnp.float32))

    def base_inputs(self, batch: Batch) -> dict[str, Array]:
        return _sequence_inputs(batch, ("inputs", "segment_ids", "positions"))

    def output_loss(self, outputs: Array, batch: Batch) -> tuple[Array, Array, Metrics]:
        weights = batch["weights"]
        if "mask" in batch:
            weights = weights * batch["mask"][:, None]
        return _token_loss(outputs, batch["targets"], weights)


@register_task
class Seq2SeqTask(LanguageModelTask):
    """Sequence-to-sequence with teacher forcing.

    Batch: ``inputs`` [b, Ls] and ``targets`` [b, Lt] int, 0 = padding. The
    decoder reads ``targets`` shifted right with ``bos_id`` first and predicts
    ``targets``; padding targets are unscored.
    """

    name = "seq2seq"
    required_keys = ("inputs", "targets")

    def base_inputs(self, batch: Batch) -> dict[str, Array]:
        targets = batch["targets"]
        bos = jnp.full((targets.shape[0], 1), self.config.get("bos_id", 0), targets.dtype)
        decoder_inputs = jnp.concatenate([bos, targets[:, :-1]], axis=1)
        return {"inputs": batch["inputs"], "decoder_inputs": decoder_inputs}

    def output_loss(self, outputs: Array, batch: Batch) -> tuple[Array, Array, Metrics]:
        targets = batch["targets"]
        weights = batch.get("weights", (targets != self.config.get("pad_id", 0))).astype(
            jnp.float32
        )
        if "mask" in batch:
            weights = weights * batch["mask"][:, None]
        return _token_loss(outputs, targets, weights)


# Tasks that live in their own modules register themselves on import; importing them
# here lets every run (and `effformer eval` on a saved config) find them by name.
from effformer.train import (  # noqa: E402, F401
    careless_whisper_task,
    ia_red_task,
    local_learning,
    paraformer_task,
    seq2seq_distillation,
    solo_task,
)
