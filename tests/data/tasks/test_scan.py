"""SCAN: the interpretation on the paper's examples, the grammar's size, the length split."""

import numpy as np
import pytest

from effformer.data.registry import get_dataset_spec
from effformer.data.tasks import TaskDataset, make_task
from effformer.data.tasks.base import SPLITS
from effformer.data.tasks.scan import commands_by_length, interpret

L, R = "I_TURN_LEFT", "I_TURN_RIGHT"


@pytest.mark.parametrize(
    "command, actions",
    [
        ("jump", ["I_JUMP"]),
        ("turn left", [L]),
        ("jump left", [L, "I_JUMP"]),
        ("turn opposite right", [R, R]),
        ("walk opposite left", [L, L, "I_WALK"]),
        ("turn around left", [L, L, L, L]),
        ("jump around right", [R, "I_JUMP"] * 4),
        ("run thrice", ["I_RUN"] * 3),
        ("look twice and turn left", ["I_LOOK", "I_LOOK", L]),
        # The paper's Figure 1 and its "after" example, by hand:
        ("jump twice after walk left", [L, "I_WALK", "I_JUMP", "I_JUMP"]),
        ("turn left twice after run", ["I_RUN", L, L]),
        ("walk around right thrice", [R, "I_WALK"] * 12),
    ],
)
def test_interpretation_by_hand(command, actions):
    assert interpret(command.split()) == actions


def test_the_grammar_and_the_papers_length_split():
    groups = commands_by_length()
    # Lake & Baroni: 20,910 commands; the length split has 16,990 train and 3,920 test commands.
    assert sum(map(len, groups.values())) == 20910
    assert sum(len(g) for n, g in groups.items() if n <= 22) == 16990
    assert sum(len(g) for n, g in groups.items() if n >= 24) == 3920
    assert sorted(n for n in groups if n > 22) == [24, 25, 26, 27, 28, 30, 32, 33, 36, 40, 48]
    assert all(len(interpret(c)) == n for n, g in groups.items() for c in g[:: max(1, len(g) // 5)])


@pytest.mark.parametrize(
    "phrase", ["turn", "walk and", "walk opposite", "jump twice twice", "left"]
)
def test_interpret_rejects_non_sentences(phrase):
    with pytest.raises(ValueError, match="is not a SCAN phrase"):
        interpret(phrase.split())


def test_dataset_sizes_answers_and_vocabulary():
    data = get_dataset_spec("scan").generated
    assert data.split_sizes["train"] == tuple(range(1, 23))
    assert data.split_sizes["test_long"] == (24, 25, 26, 27, 28, 30, 32, 33, 36, 40, 48)
    assert max(data.split_sizes["train"]) < min(data.split_sizes["test_long"])
    seen = set()
    for split in SPLITS:
        for index in range(30):
            length, prompt, answer = data.instance(split, index)
            assert length in data.split_sizes[split] and len(answer) == length
            assert answer == interpret(prompt)
            data.vocabulary.encode(prompt + answer)
            seen.add(length)
    assert seen == set(data.split_sizes["train"] + data.split_sizes["test_long"])
    # Every test size gets the same number of examples (the split cycles through the sizes).
    lengths = [data.instance("test_long", i)[0] for i in range(22)]
    assert lengths == list(data.split_sizes["test_long"]) * 2


def test_deterministic_from_the_seed():
    task = get_dataset_spec("scan").generated.task
    first, again, other = (TaskDataset(task, name="scan", seed=s) for s in (0, 0, 3))
    for split in SPLITS:
        for index in range(4):
            a, b = first.example(split, index), again.example(split, index)
            assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(
        not np.array_equal(first.example("train", i)["inputs"], other.example("train", i)["inputs"])
        for i in range(4)
    )


def test_bad_input():
    with pytest.raises(ValueError, match=r"scan: test_lengths \(20, 48\) overlap train_lengths"):
        make_task("scan", test_lengths=(20, 48))
    with pytest.raises(
        ValueError, match=r"test_lengths \(23, 23\) holds no action-sequence length"
    ):
        make_task("scan", test_lengths=(23, 23))
    with pytest.raises(
        ValueError, match=r"test_lengths \(49, 60\) holds no action-sequence length"
    ):
        make_task("scan", test_lengths=(49, 60))
    with pytest.raises(ValueError, match="no command has 23 actions"):
        make_task("scan").instance(np.random.default_rng(0), 23)


def test_a_dataset_needs_a_size_in_every_split():
    task = make_task("scan")
    all_sizes = task.sizes
    task.sizes = lambda low, high: tuple(n for n in all_sizes(low, high) if n <= 22)
    with pytest.raises(ValueError, match=r"can make no instance with a size in \(24, 48\)"):
        TaskDataset(task, name="scan_short")
