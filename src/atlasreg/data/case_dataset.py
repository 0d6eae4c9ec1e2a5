"""Training cases read and preprocessed on demand, one case per item, with an optional on-disk cache.

:class:`CaseDataset` is a map-style ``torch.utils.data.Dataset``: item ``i`` reads the image and
labelmap files of case ``i`` and resamples them onto the model grid with
:func:`atlasreg.data.cases.load_case` only when it is asked for, so no training set is ever held in
memory as one tensor, and ``DataLoader`` workers (``num_workers > 0``) can read cases in parallel.

With a cache folder, the model-grid tensors of a case are stored after its first read as one raw
float32 file (image and labelmap channels together, native byte order, written atomically) in
``<cache>/<settings key>/<file key>.f32``; the settings fix its shape, and a file of another size is
rebuilt. (Raw, not ``.npy``: ``np.fromfile`` reads a Letter-B case in 0.014 ms against 0.06-0.19 ms for
``np.load``, whose header parsing dominated the atlas update's reading;
``benchmarks/case_cache_read.py``.) The settings key hashes the
preprocessing settings and the source code and library versions of the preprocessing, and the file key hashes the two source files'
absolute paths, sizes and modification times, so a changed config, changed code or a changed file never
reuses a stale entry. A cached read costs well under 0.1 ms against 6 ms for reading and resampling
a 128x128 Letter-B PNG pair onto the 64x64 model grid (this CPU).

:class:`StreamingSum` sums cases one at a time in the order of ``torch.sum``'s CPU kernel, so the mean
of the unaligned training cases (atlas initialisation, Eq. 15 at t = 0) streams over the data set and
still equals ``atlas_init`` on the stacked tensors bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset

from ..errors import AtlasregError
from .cases import Preprocessing, load_case, pairs_from_spec
from .dataset import CasePair
from .io import atomic_file, write_text

#: File suffix of a cached case (raw float32, see the module docstring).
CACHE_SUFFIX = ".f32"

__all__ = ["CaseDataset", "CaseError", "Preprocessing", "StreamingSum", "preprocessing_fingerprint"]


class CaseError(AtlasregError):
    """An :class:`AtlasregError` raised while reading a case of a :class:`CaseDataset`.

    A ``DataLoader`` worker's exception reaches the main process re-built as ``type(e)(text)``, where
    ``text`` holds the worker's whole traceback (``torch.utils.data._utils.ExceptionWrapper``); this
    class keeps only the original one-line message (which names the file), so the command line still
    prints one line."""

    def __init__(self, message: str, path: object | None = None):
        if path is None and message.startswith(f"Caught {type(self).__name__} ") and "Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
            message = last[len(prefix):] if last.startswith(prefix) else last
        super().__init__(message, path)


def preprocessing_key(prep: Preprocessing) -> str:
    """Hex digest of the settings and of :func:`preprocessing_fingerprint` (the cache folder)."""
    text = json.dumps({"settings": asdict(prep), "code": preprocessing_fingerprint()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=1)
def preprocessing_fingerprint() -> str:
    """Hash of the code that turns files into model-grid tensors: the sources of ``atlasreg.data`` and
    ``atlasreg.spatial`` and the versions of torch, SimpleITK and NumPy. Part of every cache key, so an
    edit of the preprocessing (or of anything beside it in those packages) invalidates the cache."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(f"{torch.__version__} {sitk.Version.VersionString()} {np.__version__}".encode())
    for folder in ("data", "spatial"):
        for path in sorted((root / folder).glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _stamp(path: str) -> list | None:
    """Path, size (bytes) and modification time (ns) of a file; None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [path, st.st_size, st.st_mtime_ns]


class CaseDataset(Dataset):
    """Training cases on the model grid, read and preprocessed one at a time when indexed.

    pairs: the cases (:func:`~atlasreg.data.cases.pairs_from_spec`), each with a labelmap;
    preprocessing: model grid and labels (:class:`Preprocessing`); cache_dir: folder of the on-disk
    cache of preprocessed cases, or None for none (see the module docstring). labelled: False reads
    the images alone (self-supervised training, e.g. DeepATLAS pretraining): a case needs no
    labelmap, and one it has is not read.

    ``dataset[i]`` -> ``(image (1, *size), labelmap (C, *size), i, mask (1, *size))``: the normalised image
    and the soft one-hot labelmap over the declared labels, both float32, exactly as
    :func:`~atlasreg.data.cases.load_case` returns them (without labels: a labelmap of 0 channels,
    ``(0, *size)``). Raises :class:`CaseError` (an AtlasregError)
    naming the file for a missing, unreadable or inconsistent file, also from DataLoader workers.
    The object holds only the file list and the settings, so it is cheap to pickle to workers.
    """

    def __init__(self, pairs: Sequence[CasePair], preprocessing: Preprocessing, cache_dir: str | Path | None = None,
                 labelled: bool = True):
        self.pairs = list(pairs)
        self.labelled = bool(labelled)
        for p in self.pairs:
            if p.label is None and self.labelled:
                raise AtlasregError("no labelmap for this image", p.image)
        self.preprocessing = preprocessing
        self.cache_dir = None if cache_dir is None else Path(cache_dir).resolve() / preprocessing_key(preprocessing)
        # Absolute paths for the cache keys, made once (Path.resolve per read was half of a cached read).
        self._abs = ([(os.path.abspath(p.image), *([os.path.abspath(p.label)] if self.labelled else []))
                      for p in self.pairs] if cache_dir else None)
        self._shape = (2 + (len(preprocessing.labels) if self.labelled else 0), *preprocessing.size)

    @classmethod
    def from_config(cls, cfg: dict, section: str = "train", cache_dir: str | Path | None = None,
                    labelled: bool = True) -> "CaseDataset":
        """The cases of config section ``data.<section>`` with the config's preprocessing (`labelled`:
        see the class)."""
        pairs = pairs_from_spec(cfg["data"][section], need_labels=labelled)
        prep = Preprocessing.from_config(cfg)
        if prep.orientation_search != "none" and prep.reference is None:
            if pairs[0].label is None:
                raise AtlasregError("data.preprocessing.orientation_search needs a reference labelmap "
                                    "(data.preprocessing.reference) when the training cases have none", pairs[0].image)
            # The orientation search compares every training case with the first one.
            prep = dataclasses.replace(prep, reference=os.path.abspath(pairs[0].label))
        return cls(pairs, prep, cache_dir, labelled)

    @property
    def names(self) -> list[str]:
        """Case names, in item order."""
        return [p.name for p in self.pairs]

    def index_of(self, name: str) -> int:
        """Item index of the case called ``name``; AtlasregError if there is none."""
        for i, p in enumerate(self.pairs):
            if p.name == name:
                return i
        raise AtlasregError(f"case {name!r} is not in the data set (first cases: {self.names[:5]})")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        index = int(index)
        pair = self.pairs[index]
        entry = self._cache_entry(index)
        data = self._read_entry(entry) if entry is not None else None
        if data is None:
            data = self._load(pair)
            if entry is not None:
                self._write_entry(entry, data)
        return data[:1], data[1:-1], index, data[-1:]

    def check(self) -> None:
        """Read every case that is not in the cache yet, writing nothing, so that a bad case is found
        before a run writes anything (raises :class:`CaseError` naming the file of the first bad one).
        A case is read again when first indexed (it is not kept: memory does not grow with the cases)."""
        for index, pair in enumerate(self.pairs):
            entry = self._cache_entry(index)
            if entry is None or self._read_entry(entry) is None:
                self._load(pair)

    # ------------------------------------------------------------------------------------------
    def _load(self, pair: CasePair) -> torch.Tensor:
        """Image and labelmap channels of one case, (1 + C, *size) float32, from its files."""
        p = self.preprocessing
        try:
            case = load_case(pair.image, pair.label if self.labelled else None, p, name=pair.name)
        except AtlasregError as e:
            message = str(e)
            if e.path is not None and message.startswith(f"{e.path}: "):
                message = message[len(e.path) + 2:]
            raise CaseError(message, e.path) from None
        except Exception as e:  # noqa: BLE001 - anything else while reading a case: name the case
            raise CaseError(f"cannot preprocess case {pair.name!r}: {type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:200]}", pair.image) from None
        parts = [case.image[0], *([case.labelmap[0]] if self.labelled else []), case.mask[0]]
        return torch.cat(parts).float().contiguous()

    def _cache_entry(self, index: int) -> Path | None:
        if self.cache_dir is None:
            return None
        stamps = [_stamp(path) for path in self._abs[index]]
        if None in stamps:  # let load_case report the missing file
            return None
        return self.cache_dir / (hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:32] + CACHE_SUFFIX)

    def _read_entry(self, entry: Path) -> torch.Tensor | None:
        """The cached tensor, or None when absent or not what these settings give (then rewritten)."""
        try:
            array = np.fromfile(entry, dtype=np.float32)
        except (OSError, ValueError):
            return None
        if array.size != math.prod(self._shape):
            return None
        return torch.from_numpy(array.reshape(self._shape))

    def _write_entry(self, entry: Path, data: torch.Tensor) -> None:
        try:
            if not (entry.parent / "settings.json").is_file():
                write_text(entry.parent / "settings.json", json.dumps(
                    {"preprocessing": asdict(self.preprocessing), "code": preprocessing_fingerprint()}, indent=1))
            with atomic_file(entry) as tmp, open(tmp, "wb") as f:
                data.numpy().astype(np.float32, copy=False).tofile(f)
        except OSError as e:  # a full or read-only disk: train on without the cache
            warnings.warn(f"{entry}: cannot write the case cache ({e.strerror or e}); reading files instead",
                          stacklevel=2)
            self.cache_dir = None


class StreamingSum:
    """Sum of ``n`` equally shaped tensors given one at a time, added in the order of ``torch.sum``'s
    CPU kernel for a reduction over the leading dimension (``multi_row_sum`` in ATen's SumKernel.cpp:
    runs of 2^p rows, p = max(4, ceil(log2 n) / 4), summed into the first of four levels, each level
    carried into the next when its run is full). ``total() / n`` therefore equals
    ``torch.stack(rows).mean(0)`` bit for bit where the kernel takes that path (float32, a row length
    divisible by the vector width, e.g. model grids divisible by 8; tested), and the rounding error does
    not grow with ``n`` as a running sum's does.

    n: number of tensors that will be added (needed for the run length). Raises ValueError when more
    than ``n`` tensors are added or ``total()`` is asked before all ``n`` are in."""

    LEVELS = 4

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        self.n, self.count = int(n), 0
        self.power = max(4, math.ceil(math.log2(self.n)) // self.LEVELS) if self.n > 1 else 4
        self.step = 1 << self.power
        self.acc: list[torch.Tensor] | None = None

    def add(self, row: torch.Tensor) -> None:
        if self.count >= self.n:
            raise ValueError(f"more than the announced {self.n} tensors added")
        if self.acc is None:
            self.acc = [torch.zeros_like(row) for _ in range(self.LEVELS)]
        self.acc[0] += row
        self.count += 1
        if self.count % self.step == 0:  # a full run: carry it up the levels
            mask = self.step - 1
            for j in range(1, self.LEVELS):
                self.acc[j] += self.acc[j - 1]
                self.acc[j - 1].zero_()
                if self.count & (mask << (j * self.power)):
                    break

    def total(self) -> torch.Tensor:
        if self.count != self.n:
            raise ValueError(f"{self.count} of the announced {self.n} tensors added")
        out = self.acc[0].clone()
        for j in range(1, self.LEVELS):
            out += self.acc[j]
        return out
