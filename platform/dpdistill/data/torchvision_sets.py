"""The standard benchmark sets, read from a root folder through torchvision's dataset classes.

Layouts under the data root (torchvision 0.29's own; ``download=True`` produces them):

=============  ==================================================================================
mnist          MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (or the same names + .gz)
fashion_mnist  FashionMNIST/raw/ (same file names as MNIST)
cifar10        cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
cifar100       cifar-100-python/{train,test,meta}
svhn           svhn/{train_32x32,test_32x32}.mat (torchvision's SVHN with root=<root>/svhn)
gtsrb          gtsrb/GTSRB/Training/<00000..00042>/*.ppm, gtsrb/GTSRB/Final_Test/Images/*.ppm,
               gtsrb/GT-final_test.csv
celeba         celeba/{list_attr_celeba,identity_CelebA,list_bbox_celeba,list_landmarks_align_celeba,
               list_eval_partition}.txt and celeba/img_align_celeba/*.jpg
eurosat        eurosat/2750/<class>/*.jpg
=============  ==================================================================================

Splits follow DPImageBench: validation is a seeded random part of the official training split — 5,000 for
MNIST, FashionMNIST, CIFAR-10/100 and SVHN; 17,706 for CelebA (DPImageBench keeps 145,064 of 162,770);
10% for GTSRB. EuroSAT has no official split: a fixed stratified 4,000/27,000 test part, then 2,000/23,000 of
the rest as validation (DPImageBench's 21,000/2,000/4,000). CelebA's label is the binary ``Male`` attribute
(DPImageBench's "Gender"), its official "valid" partition is not used, and faces are centre-cropped to a
square before resizing, as DPImageBench does. File-per-image sets decode straight to the requested size
(default 32) so that CelebA fits in memory.

torchvision verifies MD5 sums of the official archives; we check presence only (so a re-packed or partial
copy still loads) and let torchvision verify what it downloads itself.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import datasets as tvd

from dpdistill.data import imageio
from dpdistill.data.base import DatasetInfo
from dpdistill.data.source import FileSource, RawPart
from dpdistill.errors import DataError


def _download_error(name: str, exc: Exception) -> DataError:
    return DataError(f"download of dataset '{name}' failed ({type(exc).__name__}: {exc}); "
                     f"fetch it by hand into data.root or set data.download: false")


def _construct(name: str, factory: Any, *args: Any, **kwargs: Any) -> Any:
    """Build a torchvision dataset, turning its 'not found' errors into one-line DataErrors."""
    try:
        return factory(*args, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise DataError(f"dataset '{name}' could not be read by torchvision: {exc}") from exc


# --- MNIST / FashionMNIST ---------------------------------------------------------------------------------

_IDX_DTYPES = {8: np.uint8, 9: np.int8, 11: ">i2", 12: ">i4", 13: ">f4", 14: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), plain or gzip-compressed, into a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims)


class MNISTSource(FileSource):
    """MNIST-format sets (IDX files under <root>/<Class>/raw), read by torchvision when uncompressed."""

    official_test = True
    val_size = 5000

    def __init__(self, info: DatasetInfo, tv_class: type[tvd.MNIST]) -> None:
        self.info = info
        self.tv_class = tv_class
        self.default_size = info.image_size

    def data_folder(self, root: Path) -> Path:
        return root / self.tv_class.__name__ / "raw"

    def expected(self, part: str) -> list[str]:
        prefix = "train" if part == "train" else "t10k"
        return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]

    def exists(self, folder: Path, name: str) -> bool:
        return (folder / name).is_file() or (folder / f"{name}.gz").is_file()

    def read(self, part: str, root: Path, size: int | None) -> RawPart:
        folder = self.data_folder(root)
        names = self.expected("train") + self.expected("test")
        if all((folder / n).is_file() for n in names):
            ds = _construct(self.info.name, self.tv_class, str(root), train=part == "train", download=False)
            images, labels = ds.data, ds.targets
        else:
            # Only the .gz files (as distributed): decompress in memory rather than writing raw copies.
            img_name, lab_name = self.expected(part)
            images = torch.from_numpy(read_idx(self._path(folder, img_name)).copy())
            labels = torch.from_numpy(read_idx(self._path(folder, lab_name)).astype(np.int64))
        if images.dim() != 3 or len(images) != len(labels):
            raise DataError(f"{folder}: {part} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                            f"do not match the MNIST layout")
        return RawPart(images.unsqueeze(1), labels.to(torch.int64))

    @staticmethod
    def _path(folder: Path, name: str) -> Path:
        return folder / name if (folder / name).is_file() else folder / f"{name}.gz"

    def download(self, root: Path, part: str) -> None:
        try:
            self.tv_class(str(root), train=part == "train", download=True)
        except Exception as exc:  # network errors come in many types
            raise _download_error(self.info.name, exc) from exc


# --- CIFAR-10 / CIFAR-100 ---------------------------------------------------------------------------------


class _PresenceOnly:
    """Mixin for torchvision's CIFAR classes: check that this split's pickles exist, not their MD5 sums."""

    root: str
    base_folder: str
    train: bool
    train_list: list[list[str | None]]
    test_list: list[list[str | None]]

    def _check_integrity(self) -> bool:
        files = self.train_list if self.train else self.test_list
        return all((Path(self.root) / self.base_folder / str(name)).is_file() for name, _ in files)


def _no_md5(files: list[list[str]]) -> list[list[str | None]]:
    return [[name, None] for name, _ in files]


class _CIFAR10Presence(_PresenceOnly, tvd.CIFAR10):
    train_list = _no_md5(tvd.CIFAR10.train_list)
    test_list = _no_md5(tvd.CIFAR10.test_list)
    meta = {**tvd.CIFAR10.meta, "md5": None}


class _CIFAR100Presence(_PresenceOnly, tvd.CIFAR100):
    train_list = _no_md5(tvd.CIFAR100.train_list)
    test_list = _no_md5(tvd.CIFAR100.test_list)
    meta = {**tvd.CIFAR100.meta, "md5": None}


class CIFARSource(FileSource):
    """CIFAR-10 / CIFAR-100 python pickle batches."""

    official_test = True
    val_size = 5000

    def __init__(self, info: DatasetInfo, tv_class: type[tvd.CIFAR10]) -> None:
        self.info = info
        self.tv_class = tv_class
        self.reader = _CIFAR100Presence if issubclass(tv_class, tvd.CIFAR100) else _CIFAR10Presence
        self.default_size = info.image_size

    def data_folder(self, root: Path) -> Path:
        return root / self.tv_class.base_folder

    def expected(self, part: str) -> list[str]:
        files = self.tv_class.train_list if part == "train" else self.tv_class.test_list
        return [name for name, _ in files] + [self.tv_class.meta["filename"]]

    def read(self, part: str, root: Path, size: int | None) -> RawPart:
        ds = _construct(self.info.name, self.reader, str(root), train=part == "train", download=False)
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        return RawPart(images, labels, class_names=tuple(ds.classes))

    def download(self, root: Path, part: str) -> None:
        try:
            self.tv_class(str(root), train=part == "train", download=True)
        except Exception as exc:
            raise _download_error(self.info.name, exc) from exc


# --- SVHN -------------------------------------------------------------------------------------------------


class _SVHNPresence(tvd.SVHN):
    split_list = {k: [url, name, None] for k, (url, name, _) in tvd.SVHN.split_list.items()}


class SVHNSource(FileSource):
    """SVHN cropped digits (.mat files); torchvision already maps label 10 to digit 0."""

    official_test = True
    val_size = 5000

    def __init__(self, info: DatasetInfo) -> None:
        self.info = info
        self.default_size = info.image_size

    def data_folder(self, root: Path) -> Path:
        return root / "svhn"

    def expected(self, part: str) -> list[str]:
        return [tvd.SVHN.split_list[part][1]]

    def read(self, part: str, root: Path, size: int | None) -> RawPart:
        ds = _construct(self.info.name, _SVHNPresence, str(self.data_folder(root)), split=part, download=False)
        images = torch.from_numpy(np.ascontiguousarray(ds.data))  # torchvision gives [N, 3, 32, 32]
        labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
        return RawPart(images, labels)

    def download(self, root: Path, part: str) -> None:
        try:
            tvd.SVHN(str(self.data_folder(root)), split=part, download=True)
        except Exception as exc:
            raise _download_error(self.info.name, exc) from exc


# --- GTSRB ------------------------------------------------------------------------------------------------


class GTSRBSource(FileSource):
    """German Traffic Sign Recognition Benchmark (.ppm files of varying size, decoded to a square)."""

    official_test = True
    val_size = 0.1

    def __init__(self, info: DatasetInfo) -> None:
        self.info = info
        self.default_size = info.image_size

    def data_folder(self, root: Path) -> Path:
        return root / "gtsrb"

    def expected(self, part: str) -> list[str]:
        if part == "train":
            return ["GTSRB/Training/"]
        return ["GTSRB/Final_Test/Images/", "GT-final_test.csv"]

    def read(self, part: str, root: Path, size: int | None) -> RawPart:
        ds = _construct(self.info.name, tvd.GTSRB, str(root), split=part, download=False)
        samples = ds._samples  # (path, class id): no public accessor in torchvision 0.29
        if part == "train":
            # torchvision numbers the class folders it finds; the folder name *is* the class id, which keeps
            # labels right on a partial copy.
            samples = [(p, _class_id(p)) for p, _ in samples]
        labels = torch.as_tensor([t for _, t in samples], dtype=torch.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.info.num_classes):
            raise DataError(f"{self.data_folder(root)}: class ids must be 0..{self.info.num_classes - 1}")
        images = imageio.decode_files([p for p, _ in samples], size, channels=3)
        return RawPart(images, labels)

    def download(self, root: Path, part: str) -> None:
        try:
            tvd.GTSRB(str(root), split=part, download=True)
        except Exception as exc:
            raise _download_error(self.info.name, exc) from exc


def _class_id(path: str) -> int:
    folder = Path(path).parent.name
    if not folder.isdigit():
        raise DataError(f"GTSRB class folder '{folder}' is not a number (expected 00000..00042)")
    return int(folder)


# --- CelebA -----------------------------------------------------------------------------------------------


class _CelebAPresence(tvd.CelebA):
    file_list = [(fid, None, name) for fid, _, name in tvd.CelebA.file_list]


class CelebASource(FileSource):
    """CelebA aligned faces with one binary attribute as the label (default 'Male', DPImageBench's Gender)."""

    official_test = True
    val_size = 17706

    def __init__(self, info: DatasetInfo, attribute: str = "Male") -> None:
        self.info = info
        self.attribute = attribute
        self.default_size = info.image_size

    def data_folder(self, root: Path) -> Path:
        return root / "celeba"

    def expected(self, part: str) -> list[str]:
        return [name for _, _, name in tvd.CelebA.file_list if not name.endswith(".zip")] + ["img_align_celeba/"]

    def read(self, part: str, root: Path, size: int | None) -> RawPart:
        ds = _construct(self.info.name, _CelebAPresence, str(root), split=part, target_type="attr",
                        download=False)
        names = [n for n in ds.attr_names if n]
        if self.attribute not in names:
            raise DataError(f"CelebA attribute '{self.attribute}' not in list_attr_celeba.txt; "
                            f"expected one of: {', '.join(names)}")
        labels = ds.attr[:, names.index(self.attribute)].to(torch.int64)
        folder = self.data_folder(root) / "img_align_celeba"
        images = imageio.decode_files([folder / f for f in ds.filename], size, channels=3, center_crop=True)
        return RawPart(images, labels)

    def download(self, root: Path, part: str) -> None:
        try:
            tvd.CelebA(str(root), split=part, download=True)
        except Exception as exc:
            raise _download_error(self.info.name, exc) from exc


# --- EuroSAT ----------------------------------------------------------------------------------------------

EUROSAT_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake")


class EuroSATSource(FileSource):
    """EuroSAT RGB (64x64 JPEGs in class folders); no official split, so test is carved with a fixed seed."""

    official_test = False
    test_size = 4000 / 27000
    val_size = 2000 / 23000

    def __init__(self, info: DatasetInfo) -> None:
        self.info = info
        self.default_size = info.image_size

    def data_folder(self, root: Path) -> Path:
        return root / "eurosat"

    def expected(self, part: str) -> list[str]:
        return ["2750/"]

    def read(self, part: str, root: Path, size: int | None) -> RawPart:
        ds = _construct(self.info.name, tvd.EuroSAT, str(root), download=False)
        unknown = sorted(set(ds.classes) - set(EUROSAT_CLASSES))
        if unknown:
            raise DataError(f"{self.data_folder(root) / '2750'}: unknown class folders {', '.join(unknown)}; "
                            f"expected {', '.join(EUROSAT_CLASSES)}")
        # Label by folder name, not by torchvision's position among the folders present: a partial copy keeps
        # the canonical class ids.
        labels = torch.as_tensor([EUROSAT_CLASSES.index(ds.classes[t]) for _, t in ds.samples], dtype=torch.int64)
        images = imageio.decode_files([p for p, _ in ds.samples], size, channels=3)
        return RawPart(images, labels)

    def download(self, root: Path, part: str) -> None:
        try:
            tvd.EuroSAT(str(root), download=True)
        except Exception as exc:
            raise _download_error(self.info.name, exc) from exc


# --- the registered instances -----------------------------------------------------------------------------

_DIGITS = tuple(str(i) for i in range(10))

SOURCES: tuple[FileSource, ...] = (
    MNISTSource(DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,), True, True, _DIGITS), tvd.MNIST),
    MNISTSource(DatasetInfo("fashion_mnist", 1, 28, 10, (0.2860,), (0.3530,), True, True,
                            tuple(tvd.FashionMNIST.classes)), tvd.FashionMNIST),
    CIFARSource(DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True, True,
                            ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                             "truck")), tvd.CIFAR10),
    CIFARSource(DatasetInfo("cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True,
                            True), tvd.CIFAR100),
    SVHNSource(DatasetInfo("svhn", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), True, True,
                           _DIGITS)),
    GTSRBSource(DatasetInfo("gtsrb", 3, 32, 43, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669), True, True)),
    CelebASource(DatasetInfo("celeba", 3, 32, 2, (0.5063, 0.4258, 0.3832), (0.3107, 0.2904, 0.2897), True, True,
                             ("female", "male"))),
    EuroSATSource(DatasetInfo("eurosat", 3, 32, 10, (0.3444, 0.3803, 0.4078), (0.2037, 0.1366, 0.1148), True,
                              True, EUROSAT_CLASSES)),
)
