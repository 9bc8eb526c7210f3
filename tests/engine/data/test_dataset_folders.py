import math
from collections import Counter

from gesso.engine.data.dataset import Subset, build_dataset


def _kohya_tree(root, make_image):
    make_image(root / "3_cat" / "a.png", 64, 64, seed=1, caption="cat, sitting")
    make_image(root / "3_cat" / "b.png", 64, 64, seed=2)  # no caption: the folder name is the caption
    make_image(root / "1_dog" / "c.png", 192, 64, seed=3, caption="dog")  # wide: a bucket of its own
    make_image(root / "top.png", 64, 64, seed=4, caption="top")
    make_image(root / "raw" / "d.png", 64, 64, seed=5, caption="not trained")
    make_image(root / ".gesso_cache" / "e.png", 64, 64, seed=6)


def test_n_name_folders_repeat_n_times(tmp_path, make_image, small):
    _kohya_tree(tmp_path, make_image)
    dataset = build_dataset([Subset(tmp_path, trigger="zzk")], small)
    assert len(dataset) == 3 + 3 + 1 + 1
    for epoch in (1, 2):
        counts = Counter(dataset.items[s.index].path.name for batch in dataset.epoch(epoch, 3, seed=0) for s in batch)
        assert counts == {"a.png": 3, "b.png": 3, "c.png": 1, "top.png": 1}
    # 7 square samples in batches of 3 -> 3 batches, the wide one alone -> 1; not ceil(8 / 3) = 3
    assert len(dataset.epoch(1, 3, seed=0)) == dataset.steps_per_epoch(3) == 4 != math.ceil(len(dataset) / 3)
    assert dataset.folders() == {"3_cat": {"n_repeats": 3, "img_count": 2}, "1_dog": {"n_repeats": 1, "img_count": 1},
                                 tmp_path.name: {"n_repeats": 1, "img_count": 1}}
    captions = {it.path.name: it.caption for it in dataset.items}
    assert captions == {"a.png": "zzk, cat, sitting", "b.png": "zzk, cat", "c.png": "zzk, dog", "top.png": "zzk, top"}
    report = dataset.report()
    assert str(tmp_path / "raw") in report and "not N_name" in report
    assert str(tmp_path / "3_cat" / "b.png") in report and "folder name used" in report
    assert ".gesso_cache" not in report


def test_explicit_repeats_win_over_the_folder_name(tmp_path, make_image, small):
    _kohya_tree(tmp_path, make_image)
    assert len(build_dataset([Subset(tmp_path / "3_cat")], small)) == 2 * 3  # the subset folder's own N_name
    assert len(build_dataset([Subset(tmp_path / "3_cat", repeats=5)], small)) == 2 * 5
    two = build_dataset([Subset(tmp_path / "3_cat", repeats=2), Subset(tmp_path / "1_dog")], small)
    assert sorted((it.path.name, it.repeats) for it in two.items) == [("a.png", 2), ("b.png", 2), ("c.png", 1)]


def test_epoch_plan_is_a_pure_function_of_epoch_and_seed(tmp_path, make_image, small):
    _kohya_tree(tmp_path, make_image)
    dataset = build_dataset([Subset(tmp_path)], small)
    assert dataset.epoch(2, 2, seed=5) == dataset.epoch(2, 2, seed=5)
    assert dataset.epoch(2, 2, seed=5) != dataset.epoch(3, 2, seed=5)
