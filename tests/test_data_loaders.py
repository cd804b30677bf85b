"""Each loader reads its dataset's real on-disk format: real MNIST when DPDISTILL_DATA has it, tiny files
written here in the exact layout torchvision 0.29 reads for the others.

Fixture images carry their record id as a flat grey level (3 + 5*id), so a loaded split can be mapped back to
the records it holds: that is how the splits are checked to be disjoint, complete and deterministic.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpdistill import data
from dpdistill.data import transforms as T
from dpdistill.errors import DataError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def level(i: int) -> int:
    return 3 + 5 * i


def ids(s: data.ImageSet) -> list[int]:
    """Record ids recovered from the flat grey levels (median: robust to markers and JPEG ringing)."""
    med = (s.images[:, 0].flatten(1).median(dim=1).values * 255).numpy()  # id lives in channel 0
    return [int(round((v - 3) / 5)) for v in med]


def check_splits(name: str, root: Path, n_total: int, sizes: tuple[int, int, int] | None = None,
                 **kw: object) -> dict[str, data.ImageSet]:
    """Load all splits twice and with another val_seed; check disjoint, complete, deterministic."""
    a = {s: data.load(name, s, root=root, **kw) for s in data.SPLITS}
    b = data.load_splits(name, root=root, **kw)
    c = {s: data.load(name, s, root=root, val_seed=7, **kw) for s in data.SPLITS}
    id_sets = {s: ids(a[s]) for s in data.SPLITS}
    everything = id_sets["train"] + id_sets["val"] + id_sets["test"]
    if sizes is not None:
        assert tuple(len(a[s]) for s in data.SPLITS) == sizes
    assert sorted(everything) == list(range(n_total)), "splits must cover every record exactly once"
    for s in data.SPLITS:
        assert a[s].images.dtype == torch.float32 and a[s].labels.dtype == torch.int64
        assert float(a[s].images.min()) >= 0.0 and float(a[s].images.max()) <= 1.0
        assert ids(b[s]) == id_sets[s], f"{s} differs between load and load_splits"
        assert a[s].name == f"{name}/{s}"
    assert ids(c["test"]) == id_sets["test"], "test must not depend on val_seed"
    assert set(ids(c["val"])) != set(id_sets["val"]), "another val_seed must give another val split"
    assert sorted(ids(c["train"]) + ids(c["val"])) == sorted(id_sets["train"] + id_sets["val"])
    return a


# --- writers for the real formats ---------------------------------------------------------------------------


def write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    if compress:
        Path(str(path) + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_mnist_like(root: Path, folder: str, n_train: int, n_test: int, compress: bool) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, n_train)):
        imgs = np.stack([np.full((28, 28), level(offset + i), np.uint8) for i in range(n)])
        imgs[:, 0, 27] = 255  # orientation marker: top-right
        write_idx(raw / f"{prefix}-images-idx3-ubyte", imgs, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(offset, offset + n) % 10, compress)


def cifar_rows(first: int, n: int) -> np.ndarray:
    """CIFAR's row layout: 1024 red, 1024 green, 1024 blue bytes; red carries the id, green its complement."""
    rows = np.zeros((n, 3072), np.uint8)
    for i in range(n):
        rows[i, :1024] = level(first + i)
        rows[i, 1024:2048] = 255 - level(first + i)
    return rows


def write_cifar10(root: Path, per_batch: int, n_test: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(5):
        first = b * per_batch
        entry = {"batch_label": f"training batch {b + 1} of 5", "data": cifar_rows(first, per_batch),
                 "labels": [(first + i) % 10 for i in range(per_batch)],
                 "filenames": [f"img_{first + i}.png" for i in range(per_batch)]}
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(entry, protocol=2))
    first = 5 * per_batch
    test = {"batch_label": "testing batch 1 of 1", "data": cifar_rows(first, n_test),
            "labels": [(first + i) % 10 for i in range(n_test)], "filenames": [f"t{i}.png" for i in range(n_test)]}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}, protocol=2))


def write_cifar100(root: Path, n_train: int, n_test: int) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, first, n in (("train", 0, n_train), ("test", n_train, n_test)):
        entry = {"data": cifar_rows(first, n), "fine_labels": [(first + i) % 100 for i in range(n)],
                 "coarse_labels": [(first + i) % 20 for i in range(n)], "filenames": [f"{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def write_svhn(root: Path, n_train: int, n_test: int) -> None:
    from scipy.io import savemat

    folder = root / "svhn"
    folder.mkdir(parents=True)
    for name, first, n in (("train_32x32.mat", 0, n_train), ("test_32x32.mat", n_train, n_test)):
        x = np.zeros((32, 32, 3, n), np.uint8)  # SVHN stores [H, W, C, N]
        for i in range(n):
            x[:, :, 0, i] = level(first + i)
        x[0, 31, 2, :] = 255  # top-right marker in blue
        y = (np.arange(first, first + n) % 10).reshape(-1, 1).astype(np.uint8)
        y[y == 0] = 10  # SVHN labels digit 0 as 10
        savemat(str(folder / name), {"X": x, "y": y})


def write_gtsrb(root: Path, train_classes: dict[int, int], n_test: int) -> int:
    base = root / "gtsrb"
    rid = 0
    for cls, n in train_classes.items():
        folder = base / "GTSRB" / "Training" / f"{cls:05d}"
        folder.mkdir(parents=True)
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for i in range(n):
            side = 30 + 7 * i  # GTSRB images differ in size
            Image.new("RGB", (side, side + 2), (level(rid),) * 3).save(folder / f"00000_{i:05d}.ppm")
            rows.append(f"00000_{i:05d}.ppm;{side};{side + 2};5;5;{side - 5};{side - 3};{cls}")
            rid += 1
        (folder / f"GT-{cls:05d}.csv").write_text("\n".join(rows) + "\n")
    images = base / "GTSRB" / "Final_Test" / "Images"
    images.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(n_test):
        Image.new("RGB", (40, 41), (level(rid),) * 3).save(images / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;40;41;5;5;35;36;{(i * 7) % 43}")
        rid += 1
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return rid


CELEBA_ATTRS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
                "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
                "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
                "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
                "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young")


def write_celeba(root: Path, partition: list[int]) -> None:
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    n = len(partition)
    attrs = CELEBA_ATTRS.split()
    male = attrs.index("Male")
    lines_attr = [str(n), " ".join(attrs) + " "]
    lines_part, lines_id, lines_bbox, lines_lm = [], [], [str(n), "image_id x_1 y_1 width height"], [
        str(n), "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x "
                "rightmouth_y"]
    for i, part in enumerate(partition):
        fname = f"{i + 1:06d}.jpg"
        img = np.full((218, 178, 3), level(i), np.uint8)
        img[:20] = 255  # bands the centre crop (178x178 of 178x218) must cut away
        img[-20:] = 255
        Image.fromarray(img).save(base / "img_align_celeba" / fname, quality=95)
        vals = ["-1"] * len(attrs)
        vals[male] = "1" if i % 3 == 0 else "-1"
        lines_attr.append(f"{fname} " + "  ".join(vals))  # the real file pads with double spaces
        lines_part.append(f"{fname} {part}")
        lines_id.append(f"{fname} {1000 + i}")
        lines_bbox.append(f"{fname}    95  71 226 313")
        lines_lm.append(f"{fname} 69  109  106  113   77  142   73  152  108  154")
    for name, lines in (("list_attr_celeba.txt", lines_attr), ("list_eval_partition.txt", lines_part),
                        ("identity_CelebA.txt", lines_id), ("list_bbox_celeba.txt", lines_bbox),
                        ("list_landmarks_align_celeba.txt", lines_lm)):
        (base / name).write_text("\n".join(lines) + "\n")


def write_eurosat(root: Path, classes: list[str], per_class: int) -> int:
    rid = 0
    for cls in classes:
        folder = root / "eurosat" / "2750" / cls
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (64, 64), (level(rid),) * 3).save(folder / f"{cls}_{i + 1}.jpg", quality=95)
            rid += 1
    return rid


# --- registry and basic types ---------------------------------------------------------------------------------


def test_registry_lists_every_required_set_and_rejects_unknown_names() -> None:
    required = {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "gtsrb", "celeba", "eurosat",
                "imagefolder", "npz", "glyphs"}
    assert required <= set(data.names())
    assert data.names() == sorted(data.names())
    with pytest.raises(DataError, match=r"unknown dataset 'mnistt'; expected one of: .*mnist"):
        data.get("mnistt")
    assert data.get("mnist").info.needs_root and not data.get("digits").info.needs_root


def test_register_adds_a_source(monkeypatch: pytest.MonkeyPatch) -> None:
    from dpdistill.data import registry

    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    src = data.GlyphsSource("digits", num_per_class=2, name="tiny_glyphs")
    assert data.register(src) is src
    assert "tiny_glyphs" in data.names()
    assert len(data.load("tiny_glyphs")) == 20


def test_imageset_helpers() -> None:
    labels = torch.tensor([2, 0, 2, 1, 2])
    s = data.ImageSet(torch.rand(5, 1, 4, 4), labels, 4, "x/train")
    assert len(s) == 5 and s.class_counts().tolist() == [1, 1, 3, 0]
    per = s.per_class_indices()
    assert [p.tolist() for p in per] == [[1], [3], [0, 2, 4], []]
    sub = s.subset(np.array([4, 0]))
    assert sub.labels.tolist() == [2, 2] and torch.equal(sub.images[1], s.images[0])
    with pytest.raises(ValueError, match="float32"):
        data.ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 1, "bad")


def test_transforms_normalize_and_resize() -> None:
    x = torch.rand(3, 3, 8, 8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    y = T.normalize(x, mean, std)
    assert torch.allclose(y[:, 1], (x[:, 1] - 0.2) / 0.25)
    assert torch.allclose(T.denormalize(y, mean, std), x, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        T.normalize(x, (0.5,), (0.5,))
    flat = torch.full((2, 1, 28, 28), 0.25)
    r = T.resize(flat, 32)
    assert r.shape == (2, 1, 32, 32) and torch.allclose(r, torch.full_like(r, 0.25), atol=1e-6)
    # Antialiasing: a 1-pixel checkerboard shrunk by 4 averages to grey instead of aliasing to black/white.
    board = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float().view(1, 1, 16, 16)
    small = T.resize(board, 4)
    assert float((small - 0.5).abs().max()) < 0.1


# --- digits (embedded) ----------------------------------------------------------------------------------------


def test_digits_loads_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPDISTILL_DATA", raising=False)
    parts = data.load_splits("digits")
    assert [len(parts[s]) for s in data.SPLITS] == [1294, 144, 359]
    assert parts["train"].images.shape[1:] == (1, 8, 8)
    assert float(parts["train"].images.max()) == 1.0 and float(parts["train"].images.min()) == 0.0
    assert data.load("digits", "test", image_size=16).images.shape[1:] == (1, 16, 16)
    assert parts["train"].num_classes == 10 and parts["test"].class_counts().min() >= 35


# --- MNIST, the real thing ------------------------------------------------------------------------------------


def mnist_root() -> Path:
    root = data.default_root()
    if root is None:
        pytest.skip("DPDISTILL_DATA is not set: real MNIST unavailable (set it to the folder holding MNIST/raw)")
    if not data.get("mnist").is_present(root):
        pytest.skip(f"real MNIST not found under {root}/MNIST/raw")
    return root


def test_real_mnist_splits_and_class_counts() -> None:
    root = mnist_root()
    t0 = time.perf_counter()
    parts = data.load_splits("mnist")  # root from DPDISTILL_DATA
    elapsed = time.perf_counter() - t0
    assert [len(parts[s]) for s in data.SPLITS] == [55000, 5000, 10000]
    counts = (parts["train"].class_counts() + parts["val"].class_counts()).tolist()
    assert counts == MNIST_TRAIN_COUNTS
    assert parts["test"].images.shape == (10000, 1, 28, 28) and parts["test"].images.dtype == torch.float32
    assert 0.12 < float(parts["test"].images.mean()) < 0.14  # MNIST's well-known mean ~0.1325
    assert elapsed < 30, f"loading MNIST took {elapsed:.1f}s"  # generous: a few seconds expected
    val_again = data.load("mnist", "val", root=root)
    assert torch.equal(val_again.images, parts["val"].images)
    assert not torch.equal(data.load("mnist", "val", root=root, val_seed=1).labels, parts["val"].labels)


# --- FashionMNIST: IDX raw (through torchvision) and IDX .gz (as distributed) ---------------------------------


def test_fashion_mnist_raw_idx(tmp_path: Path) -> None:
    import torchvision

    write_mnist_like(tmp_path, "FashionMNIST", n_train=40, n_test=10, compress=False)
    # The writer produces files torchvision itself accepts.
    assert len(torchvision.datasets.FashionMNIST(str(tmp_path), train=True)) == 40
    parts = check_splits("fashion_mnist", tmp_path, 50, sizes=(36, 4, 10))
    train = parts["train"]
    assert train.images.shape[1:] == (1, 28, 28)
    assert torch.all(train.images[:, 0, 0, 27] == 1.0), "top-right marker moved: image orientation is wrong"
    assert [i % 10 for i in ids(train)] == train.labels.tolist()
    assert train.class_names[0] == "T-shirt/top"
    assert data.load("fashion_mnist", "test", root=tmp_path, image_size=32).images.shape[1:] == (1, 32, 32)


def test_fashion_mnist_gz_only(tmp_path: Path) -> None:
    write_mnist_like(tmp_path, "FashionMNIST", n_train=40, n_test=10, compress=True)
    assert not list((tmp_path / "FashionMNIST" / "raw").glob("*-ubyte"))
    check_splits("fashion_mnist", tmp_path, 50, sizes=(36, 4, 10))
    assert sorted(p.name for p in (tmp_path / "FashionMNIST" / "raw").iterdir())[0].endswith(".gz"), \
        "loading must not write decompressed copies"


# --- CIFAR ------------------------------------------------------------------------------------------------------


def test_cifar10_pickle_batches(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=8, n_test=6)
    parts = check_splits("cifar10", tmp_path, 46, sizes=(36, 4, 6))
    img = parts["test"].images
    assert img.shape[1:] == (3, 32, 32)
    # Channel order survives: red carries the id, green its complement, blue is empty.
    assert torch.allclose(img[:, 0] + img[:, 1], torch.ones_like(img[:, 0]), atol=1e-6)
    assert float(img[:, 2].max()) == 0.0
    assert [i % 10 for i in ids(parts["train"])] == parts["train"].labels.tolist()
    assert parts["train"].class_names[-1] == "truck"


def test_cifar100_pickles(tmp_path: Path) -> None:
    write_cifar100(tmp_path, n_train=30, n_test=5)
    parts = check_splits("cifar100", tmp_path, 35, sizes=(27, 3, 5))
    assert parts["test"].num_classes == 100
    assert [i % 100 for i in ids(parts["test"])] == parts["test"].labels.tolist()  # fine labels


# --- SVHN -------------------------------------------------------------------------------------------------------


def test_svhn_mat_files(tmp_path: Path) -> None:
    write_svhn(tmp_path, n_train=30, n_test=8)
    parts = check_splits("svhn", tmp_path, 38, sizes=(27, 3, 8))
    train = parts["train"]
    assert [i % 10 for i in ids(train)] == train.labels.tolist(), "label 10 must become digit 0"
    assert torch.all(train.images[:, 2, 0, 31] == 1.0) and torch.all(train.images[:, 2, 31, 0] == 0.0)


# --- GTSRB ------------------------------------------------------------------------------------------------------


def test_gtsrb_folder_layout(tmp_path: Path) -> None:
    n = write_gtsrb(tmp_path, {0: 4, 5: 3, 42: 3}, n_test=5)
    parts = check_splits("gtsrb", tmp_path, n, sizes=(9, 1, 5))
    train = parts["train"]
    assert train.images.shape[1:] == (3, 32, 32), "varying GTSRB sizes must be resized to the default 32"
    assert set(train.labels.tolist()) <= {0, 5, 42} and train.num_classes == 43
    label_of = {i: c for i, c in enumerate([0] * 4 + [5] * 3 + [42] * 3)}
    assert [label_of[i] for i in ids(train)] == train.labels.tolist(), "class id = folder name"
    assert parts["test"].labels.tolist() == [((i - 10) * 7) % 43 for i in ids(parts["test"])]
    assert data.load("gtsrb", "test", root=tmp_path, image_size=48).images.shape[1:] == (3, 48, 48)


# --- CelebA -----------------------------------------------------------------------------------------------------


def test_celeba_txt_files_and_jpgs(tmp_path: Path) -> None:
    partition = [0] * 20 + [1] * 3 + [2] * 5
    write_celeba(tmp_path, partition)
    official_train = [i for i, p in enumerate(partition) if p == 0]
    parts = {s: data.load("celeba", s, root=tmp_path) for s in data.SPLITS}
    assert [len(parts[s]) for s in data.SPLITS] == [18, 2, 5]
    train_ids, val_ids = ids(parts["train"]), ids(parts["val"])
    assert sorted(train_ids + val_ids) == official_train, "val is carved from the official train partition"
    assert ids(parts["test"]) == [i for i, p in enumerate(partition) if p == 2]
    assert parts["train"].labels.tolist() == [int(i % 3 == 0) for i in train_ids], "label = Male attribute"
    img = parts["train"].images
    assert img.shape[1:] == (3, 32, 32)
    # Centre crop removed the white bands: the frame is the record's grey level (its outermost rows may
    # carry JPEG ringing from the band edge; uncropped, the bands would lift the mean by ~0.13).
    expected = torch.tensor([level(i) / 255 for i in train_ids]).view(-1, 1, 1, 1)
    assert float((img[:, :, 2:-2] - expected).abs().max()) < 0.04
    assert float((img.mean(dim=(1, 2, 3)) - expected.flatten()).abs().max()) < 0.03
    assert set(ids(data.load("celeba", "val", root=tmp_path, val_seed=3))) != set(val_ids)


# --- EuroSAT ----------------------------------------------------------------------------------------------------


def test_eurosat_class_folders(tmp_path: Path) -> None:
    from dpdistill.data.torchvision_sets import EUROSAT_CLASSES

    n = write_eurosat(tmp_path, list(EUROSAT_CLASSES), per_class=3)
    parts = check_splits("eurosat", tmp_path, n, sizes=(24, 2, 4))
    train = parts["train"]
    assert train.images.shape[1:] == (3, 32, 32)
    assert [i // 3 for i in ids(train)] == train.labels.tolist()
    assert data.load("eurosat", "test", root=tmp_path, image_size=64).images.shape[1:] == (3, 64, 64)


def test_eurosat_partial_copy_keeps_canonical_labels(tmp_path: Path) -> None:
    write_eurosat(tmp_path, ["Forest", "SeaLake"], per_class=5)
    s = data.load_splits("eurosat", root=tmp_path)
    assert set(torch.cat([s[k].labels for k in data.SPLITS]).tolist()) == {1, 9}


# --- user sets: image folder and npz ----------------------------------------------------------------------------


def test_imagefolder_png(tmp_path: Path) -> None:
    rid = 0
    for cls in ("cat", "dog", "emu"):
        (tmp_path / "pets" / cls).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (12, 12), level(rid)).save(tmp_path / "pets" / cls / f"{i}.png")
            rid += 1
    root = tmp_path / "pets"
    parts = check_splits("imagefolder", root, 30, sizes=(22, 2, 6))
    train = parts["train"]
    assert train.images.shape[1:] == (1, 12, 12), "all-grey folder loads as one channel, stored size kept"
    assert train.class_names == ("cat", "dog", "emu") and train.num_classes == 3
    assert [i // 10 for i in ids(train)] == train.labels.tolist()
    assert parts["test"].class_counts().tolist() == [2, 2, 2], "test is stratified"
    Image.new("RGB", (12, 12), (level(rid), level(rid), level(rid))).save(root / "emu" / "colour.png")
    assert data.load("imagefolder", "test", root=root).images.shape[1] == 3


def test_imagefolder_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    for cls, side in (("a", 10), ("b", 14)):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (side, side), (i, i, i)).save(tmp_path / cls / f"{i}.png")
    with pytest.raises(DataError, match="image_size"):
        data.load("imagefolder", root=tmp_path)
    assert data.load("imagefolder", root=tmp_path, image_size=16).images.shape[1:] == (3, 16, 16)


def test_npz_uint8_and_float(tmp_path: Path) -> None:
    x = np.stack([np.full((9, 9), level(i), np.uint8) for i in range(40)])
    y = np.arange(40) % 4
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    parts = check_splits("npz", tmp_path / "mine.npz", 40, sizes=(29, 3, 8))
    assert parts["train"].images.shape[1:] == (1, 9, 9) and parts["train"].num_classes == 4
    assert [i % 4 for i in ids(parts["train"])] == parts["train"].labels.tolist()

    xf = np.random.default_rng(0).random((20, 6, 6, 3)).astype(np.float64)
    np.savez(tmp_path / "float.npz", x=xf, y=np.arange(20) % 2, class_names=np.array(["no", "yes"]))
    s = data.load_splits("npz", root=tmp_path / "float.npz")
    assert s["train"].images.shape[1:] == (3, 6, 6) and s["train"].class_names == ("no", "yes")
    total = sum(float(s[k].images.sum()) for k in data.SPLITS)
    assert total == pytest.approx(float(xf.astype(np.float32).sum()), rel=1e-5)
    assert data.load("npz", root=tmp_path / "float.npz", image_size=12).images.shape[1:] == (3, 12, 12)


def test_npz_rejects_malformed_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "noy.npz", x=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DataError, match="'x' and 'y'"):
        data.load("npz", root=tmp_path / "noy.npz")
    np.savez(tmp_path / "range.npz", x=np.full((4, 8, 8), 3.0), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        data.load("npz", root=tmp_path / "range.npz")
    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 8), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="x must be"):
        data.load("npz", root=tmp_path / "shape.npz")


# --- missing data and bad arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "folder", "a_file"),
    [
        ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
        ("fashion_mnist", "FashionMNIST/raw", "train-labels-idx1-ubyte"),
        ("cifar10", "cifar-10-batches-py", "data_batch_1"),
        ("cifar100", "cifar-100-python", "train"),
        ("svhn", "svhn", "train_32x32.mat"),
        ("gtsrb", "gtsrb", "GTSRB/Training/"),
        ("celeba", "celeba", "list_attr_celeba.txt"),
        ("eurosat", "eurosat", "2750/"),
    ],
)
def test_missing_set_names_folder_and_files(tmp_path: Path, name: str, folder: str, a_file: str) -> None:
    with pytest.raises(DataError) as err:
        data.load(name, root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"dataset '{name}' not found under {tmp_path / folder}: expected ")
    assert a_file in msg and "DPDISTILL_DATA" in msg and "data.download: true" in msg
    assert not data.get(name).is_present(tmp_path)
    assert any(a_file.rstrip("/") in f for f in data.get(name).expected_files(tmp_path))


def test_missing_user_data_and_no_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=f"dataset 'imagefolder' not found under {tmp_path / 'nope'}") as err:
        data.load("imagefolder", root=tmp_path / "nope")
    assert "download" not in str(err.value), "user sets cannot be downloaded: do not suggest it"
    with pytest.raises(DataError, match="dataset 'npz' not found"):
        data.load("npz", root=tmp_path / "x.npz")
    monkeypatch.delenv("DPDISTILL_DATA", raising=False)
    with pytest.raises(DataError, match="dataset 'cifar10' needs a data root.*DPDISTILL_DATA"):
        data.load("cifar10")
    monkeypatch.setenv("DPDISTILL_DATA", str(tmp_path))
    assert data.default_root() == tmp_path
    with pytest.raises(DataError, match=f"not found under {tmp_path / 'cifar-10-batches-py'}"):
        data.load("cifar10")


def test_partial_copy_reports_what_is_missing(tmp_path: Path) -> None:
    write_mnist_like(tmp_path, "MNIST", n_train=20, n_test=5, compress=False)
    os.remove(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    assert len(data.load("mnist", "train", root=tmp_path)) == 18  # train needs only the train files
    with pytest.raises(DataError, match=r"\(missing: t10k-labels-idx1-ubyte\)"):
        data.load("mnist", "test", root=tmp_path)


def test_download_happens_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = data.get("fashion_mnist")
    calls: list[tuple[Path, str]] = []

    def fake_download(root: Path, part: str) -> None:  # stands in for torchvision's fetch
        calls.append((root, part))
        write_mnist_like(root, "FashionMNIST", n_train=20, n_test=5, compress=True)

    monkeypatch.setattr(src, "download", fake_download)
    with pytest.raises(DataError, match="not found"):
        data.load("fashion_mnist", root=tmp_path)
    assert calls == []
    assert len(data.load("fashion_mnist", "test", root=tmp_path, download=True)) == 5
    assert calls == [(tmp_path, "test")]
    data.load("fashion_mnist", "train", root=tmp_path, download=True)
    assert len(calls) == 1, "present data is not fetched again"


def test_unknown_split_is_a_data_error() -> None:
    with pytest.raises(DataError, match="unknown split 'dev' for dataset 'digits'; expected one of: train, val, test"):
        data.load("digits", "dev")
