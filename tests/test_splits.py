from collections import Counter

import numpy as np
import pytest

from dermbatch.errors import UsageError
from trainer.splits import load_or_make, make_splits


def _data(n=600, seed=0):
    rng = np.random.default_rng(seed)
    groups = [f"L{i // 3 if i % 5 else i}" for i in range(n)]  # lesions with 1-3 images
    label_of = {g: int(rng.choice(7, p=[.11, .67, .05, .03, .11, .015, .015])) for g in set(groups)}
    labels = [label_of[g] for g in groups]
    return [f"ISIC_{i:07d}" for i in range(n)], labels, groups


def test_no_lesion_in_two_folds_and_classes_are_stratified():
    ids, labels, groups = _data()
    fold_of = make_splits(ids, 5, seed=1, labels=labels, groups=groups)
    assert sorted(set(fold_of.values())) == [0, 1, 2, 3, 4] and set(fold_of) == set(ids)
    folds_of_group = {}
    for image_id, group in zip(ids, groups, strict=True):
        folds_of_group.setdefault(group, set()).add(fold_of[image_id])
    assert all(len(f) == 1 for f in folds_of_group.values())
    overall = Counter(labels)
    for fold in range(5):
        members = [lab for i, lab in zip(ids, labels, strict=True) if fold_of[i] == fold]
        for cls, count in overall.items():
            share = Counter(members)[cls] / len(members)
            assert abs(share - count / len(ids)) < 0.05, (fold, cls)


def test_seed_decides_the_split():
    ids, labels, groups = _data()
    a, b = make_splits(ids, 5, 1, labels, groups), make_splits(ids, 5, 1, labels, groups)
    assert a == b and a != make_splits(ids, 5, 2, labels, groups)


def test_unstratified_split_is_grouped_and_balanced():
    ids, _, groups = _data(300)
    fold_of = make_splits(ids, 3, seed=0, groups=groups)
    sizes = Counter(fold_of.values())
    assert max(sizes.values()) - min(sizes.values()) <= 3


def test_saved_split_is_reused_and_a_different_data_set_is_refused(tmp_path):
    ids, labels, groups = _data(100)
    first = load_or_make(tmp_path, "classification", ids, 2, 0, labels, groups)
    assert load_or_make(tmp_path, "classification", ids, 2, seed=99) == first  # reused, seed ignored
    with pytest.raises(UsageError, match="saved classification split"):
        load_or_make(tmp_path, "classification", ids[:50], 2, 0)
