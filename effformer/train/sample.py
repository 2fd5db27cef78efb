"""Continue the prompts of a trained language model's data: ``effformer generate``.

For runs on the generated sequence tasks (``effformer.data.tasks``: copy,
reverse, sorting, SCAN, chain of thought, ...), whose records say where the
prompt ends (``prompt_length``) and whose vocabulary turns ids back into
symbols. Each example's prompt is continued by the run's model with the
KV-cached loop of ``effformer.models.generate`` and compared with the
dataset's answer:

* ``causal_lm`` runs (a decoder or prefix LM ``TransformerLM``, or a
  ``MambaLM``): the prompt is the row up to and including ``<sep>``; the
  continuation is cut after its first ``<eos>``; a prefix LM gets the prefix it
  trained with (the records' ``prefix_lengths``, else the prompt: see
  ``effformer.train.tasks.CausalLMTask.prompt_is_prefix``);
* ``seq2seq`` runs (an ``EncoderDecoderLM``): the prompt is the source; the
  decoder starts from the task's ``bos_id`` (0).

A run of a task built on one of these (``causal_lm_distillation``,
``seq2seq_distillation``: a student) is continued as that one.

A continuation is ``exact`` when it is the answer followed by ``<eos>``. With
greedy decoding this is the exact match that ``effformer.train.sequence_eval``
computes with teacher forcing (see its docstring). Every example of a split
is the same at every call (the datasets are generated from their seed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effformer.data.registry import get_dataset_spec, load_builder
from effformer.data.tasks.base import EOS
from effformer.models.generate import generate, generate_seq2seq
from effformer.models.mamba_lm import MambaLM, generate_mamba
from effformer.models.transformer_lm import EncoderDecoderLM, TransformerLM
from effformer.train.tasks import CausalLMTask, Seq2SeqTask

TASKS = ("causal_lm", "seq2seq")
_TASK_CLASSES = {"causal_lm": CausalLMTask, "seq2seq": Seq2SeqTask}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One example: its size, prompt, the dataset's answer and the model's continuation.

    ``prompt`` / ``answer`` / ``generated`` are symbols; ``answer`` and
    ``generated`` end with ``<eos>`` (``generated`` only if the model emitted it
    within ``max_new_tokens``).
    """

    index: int
    size: int
    prompt: list[str]
    answer: list[str]
    generated: list[str]

    @property
    def exact(self) -> bool:
        return self.generated == self.answer


def _dataset(config: Any) -> Any:
    data = load_builder(get_dataset_spec(config.data.name), config.data.data_dir)
    if not all(hasattr(data, name) for name in ("vocabulary", "example", "num_examples")):
        raise ValueError(
            "sample_continuations: the run's dataset must be a generated sequence task "
            "(effformer.data.tasks: records with prompt_length and a vocabulary), got "
            f"config.data.name={config.data.name!r}."
        )
    return data


def _symbols(vocabulary: Any, ids: Any) -> list[str]:
    """Ids -> symbols, cut after the first <eos>; ids past the data's vocabulary as <id N>."""
    symbols = []
    for token in np.asarray(ids).tolist():
        symbols.append(vocabulary.symbols[token] if token < len(vocabulary) else f"<id {token}>")
        if symbols[-1] == EOS:
            break
    return symbols


def sample_continuations(
    experiment: Any,
    variables: dict[str, Any],
    *,
    split: str = "test",
    num_examples: int = 8,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[Sample]:
    """Continue the first ``num_examples`` prompts of ``split`` with the run's model.

    experiment: the run's ``Experiment`` (``effformer.train.restore(workdir).experiment``);
    variables: ``{"params": ..., **model_state}`` (``RestoredRun.variables``);
    max_new_tokens: default the longest answer (with ``<eos>``) the rows can hold;
    temperature / top_k / seed: sampling (greedy by default, see
    ``effformer.models.generate.sample_logits``).
    Returns one :class:`Sample` per example, in order.
    """
    config, model = experiment.config, experiment.model
    # The layout the run's task reads; a task built on one (causal_lm_distillation, the
    # student of a distillation run) gives the model the same inputs.
    run_task = getattr(experiment, "task", None)
    task = next((name for name, cls in _TASK_CLASSES.items() if isinstance(run_task, cls)), None)
    if task is None:
        raise ValueError(
            f"sample_continuations: the run's task must be one of {TASKS} or built on one (a "
            "language model on a generated sequence task, e.g. causal_lm_distillation), got "
            f"config.task.name={config.task.name!r}."
        )
    data = _dataset(config)
    if data.format != task:
        raise ValueError(
            f"sample_continuations: the dataset {config.data.name!r} has the {data.format!r} "
            f"layout but the run's task is {config.task.name!r} ({task})."
        )
    available = data.num_examples.get(split, 0)
    if split not in data.num_examples:
        raise ValueError(
            f"sample_continuations: split must be one of {sorted(data.num_examples)}, "
            f"got {split!r}."
        )
    # A bool or a non-int is refused as out of range, and the message shows what was given.
    is_int = isinstance(num_examples, int) and not isinstance(num_examples, bool)
    if not (is_int and 1 <= num_examples <= available):
        raise ValueError(
            f"sample_continuations: num_examples must be an int in [1, {available}] (the size "
            f"of split {split!r}), got {num_examples!r}."
        )
    records = [data.example(split, index) for index in range(num_examples)]
    batch = {key: np.stack([r[key] for r in records]) for key in records[0]}
    eos = data.vocabulary.encode([EOS])[0]
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    rng = jax.random.PRNGKey(seed)
    sampling = dict(rng=rng, temperature=temperature, top_k=top_k, eos_id=eos, pad_id=0)

    if task == "causal_lm":
        lengths = batch["prompt_length"].astype(np.int32)
        width = int(lengths.max())
        prompts = np.where(np.arange(width)[None] < lengths[:, None], batch["inputs"][:, :width], 0)
        new = max_new_tokens
        if new is None:
            new = int(batch["inputs"].shape[1] - lengths.min())
        if isinstance(model, MambaLM):
            out = generate_mamba(model, params, jnp.asarray(prompts), lengths,
                                 max_new_tokens=new, **sampling)  # fmt: skip
        elif isinstance(model, TransformerLM) and model.kind in ("decoder", "prefix_lm"):
            # A prefix LM runs as it trained (CausalLMTask.prompt_is_prefix): the records'
            # prefix_lengths, else its prompt (prompt_length), as sequence_eval scores it.
            prefixes = None
            if model.kind == "prefix_lm":
                prefixes = batch.get("prefix_lengths", lengths)
            out = generate(model, params, jnp.asarray(prompts), lengths, max_new_tokens=new,
                           prefix_lengths=prefixes, model_state=model_state,
                           **sampling)  # fmt: skip
        else:
            raise ValueError(
                "sample_continuations: a causal_lm run needs a decoder or prefix-LM "
                f"TransformerLM or a MambaLM, got {type(model).__name__}."
            )
        prompt_ids = [row[:n] for row, n in zip(batch["inputs"], lengths, strict=True)]
        answer_ids = [row[n:] for row, n in zip(batch["inputs"], lengths, strict=True)]
    else:
        if not isinstance(model, EncoderDecoderLM):
            raise ValueError(
                "sample_continuations: a seq2seq run needs an EncoderDecoderLM, got "
                f"{type(model).__name__}."
            )
        new = int(batch["targets"].shape[1]) if max_new_tokens is None else max_new_tokens
        start = int(config.task.get("bos_id", 0))
        out = generate_seq2seq(model, params, jnp.asarray(batch["inputs"]), max_new_tokens=new,
                               decoder_start_id=start, model_state=model_state,
                               **sampling)  # fmt: skip
        prompt_ids = [
            row[:n] for row, n in zip(batch["inputs"], batch["prompt_length"], strict=True)
        ]
        answer_ids = list(batch["targets"])
    generated = np.asarray(out.new_tokens)
    return [
        Sample(
            index=index,
            size=int(batch["length"][index]),
            prompt=data.vocabulary.decode(prompt_ids[index]),
            answer=_symbols(data.vocabulary, answer_ids[index]),
            generated=_symbols(data.vocabulary, generated[index]),
        )
        for index in range(num_examples)
    ]
