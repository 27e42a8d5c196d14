"""Reading images and writing masks for ``qseg predict``: TIFF, NIfTI and ``.npy``.

An image is read as ``(C, *spatial)`` float32 with what is needed to write its mask in the
same format and geometry (a NIfTI file's affine and header). A mask is written to a
temporary name beside its destination and renamed when complete, so a failure never leaves
a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qseg.errors import DataError

__all__ = ["FORMATS", "Image", "Normalize", "normalize", "read_image", "write_mask"]

#: file name endings ``qseg predict`` reads and writes, by format
FORMATS = {"tiff": (".tif", ".tiff"), "nifti": (".nii", ".nii.gz"), "npy": (".npy",)}
Normalize = Literal["none", "percentile", "zscore"]


@dataclass
class Image:
    """One input image: ``array`` is ``(C, *spatial)`` float32; ``format`` one of
    :data:`FORMATS`; ``nifti`` the nibabel image a NIfTI file was read from (its affine
    and header go to the mask).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "volume.npy"
        >>> np.save(path, np.zeros((2, 16, 32, 32), np.uint16))  # two channels, channels first
        >>> image = read_image(path, spatial_dims=3)
        >>> image.format, image.array.shape, image.array.dtype
        ('npy', (2, 16, 32, 32), dtype('float32'))
    """

    path: Path
    array: np.ndarray
    format: str
    nifti: Any = None


def file_format(path: Path) -> str:
    """The format of ``path`` from its ending.

    Example:
        >>> file_format(Path("ct/case_01.nii.gz"))
        'nifti'
    """
    name = path.name.lower()
    for fmt, endings in FORMATS.items():
        if name.endswith(endings):
            return fmt
    known = ", ".join(e for endings in FORMATS.values() for e in endings)
    raise DataError(f"{path}: qseg predict reads {known}; the file's ending is none of them")


def read_image(path: str | os.PathLike, spatial_dims: int) -> Image:
    """Read ``path`` as ``(C, *spatial)`` for a model of ``spatial_dims`` spatial axes.

    A TIFF or ``.npy`` array of ``spatial_dims`` axes gets one channel; one of
    ``spatial_dims + 1`` axes is channels first. A NIfTI volume ``(X, Y, Z)`` is one channel,
    ``(X, Y, Z, C)`` channels last (NIfTI's order), read with ``nibabel`` (``qseg[nifti]``).

    Raises:
        DataError: the file is missing, cannot be read, or its axes do not fit.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "frame.npy"
        >>> np.save(path, np.zeros((64, 80)))
        >>> read_image(path, spatial_dims=2).array.shape
        (1, 64, 80)
    """
    path = Path(path)
    fmt = file_format(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    nifti = None
    try:
        if fmt == "tiff":
            import tifffile

            array = tifffile.imread(path)
        elif fmt == "npy":
            array = np.load(path, allow_pickle=False)
        else:
            nibabel = _nibabel()
            nifti = nibabel.load(path)
            array = np.asarray(nifti.dataobj)
            if array.ndim == spatial_dims + 1:
                array = np.moveaxis(array, -1, 0)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read it as {fmt}: {exc}") from exc
    if array.size == 0:  # tifffile reads some broken files as an empty array
        raise DataError(f"{path}: cannot read it as {fmt}: the file holds no image data")
    if array.ndim == spatial_dims:
        array = array[None]
    if array.ndim != spatial_dims + 1:
        raise DataError(
            f"{path}: shape {array.shape} does not fit a model of {spatial_dims} spatial axes: "
            f"expected {spatial_dims} axes, or {spatial_dims + 1} with channels first"
        )
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{path}: holds {array.dtype}, not numbers")
    return Image(path, np.ascontiguousarray(array, dtype=np.float32), fmt, nifti)


def normalize(array: np.ndarray, how: Normalize) -> np.ndarray:
    """Scale each channel as the model was trained: ``"percentile"`` maps the 1st and
    99.8th percentiles to 0 and 1 (as :func:`qseg.data.load_hela`), ``"zscore"`` to zero
    mean and unit deviation, ``"none"`` keeps the values.

    Example:
        >>> [round(float(v), 2) for v in normalize(np.array([[0.0, 2.0, 4.0]]), "zscore")[0]]
        [-1.22, 0.0, 1.22]
    """
    if how == "none":
        return array
    out = np.empty_like(array, dtype=np.float32)
    for c, channel in enumerate(array):
        if how == "percentile":
            low, high = np.percentile(channel, (1.0, 99.8))
            out[c] = (channel - low) / max(high - low, 1e-8)
        elif how == "zscore":
            out[c] = (channel - channel.mean()) / max(float(channel.std()), 1e-8)
        else:
            raise DataError(f"normalize must be 'none', 'percentile' or 'zscore', got {how!r}")
    return out


def write_mask(image: Image, mask: np.ndarray, folder: str | os.PathLike) -> Path:
    """Write ``mask`` (``(*spatial)`` integer labels) into ``folder`` under the image's file
    name, in its format; a NIfTI mask keeps the image's affine and header (as uint8).

    Raises:
        DataError: the folder cannot be created or written, or would overwrite the image.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> np.save(folder / "a.npy", np.zeros((4, 4)))
        >>> image = read_image(folder / "a.npy", spatial_dims=2)
        >>> write_mask(image, np.ones((4, 4), np.uint8), folder / "masks").name
        'a.npy'
    """
    folder = Path(folder)
    target = folder / image.path.name
    if target.resolve() == image.path.resolve():
        raise DataError(f"{target}: the mask would overwrite its image; give another output folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        ending = next(e for e in FORMATS[image.format] if image.path.name.lower().endswith(e))
        handle, temporary = tempfile.mkstemp(prefix=f".{image.path.name}.", suffix=ending, dir=folder)
        os.close(handle)
    except OSError as exc:
        raise DataError(f"cannot write into {folder}: {exc.strerror or exc}") from exc
    try:
        _write(image, mask.astype(np.uint8), Path(temporary))
        os.replace(temporary, target)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise DataError(f"cannot write {target}: {exc.strerror or exc}") from exc
        raise
    return target


def _write(image: Image, mask: np.ndarray, path: Path) -> None:
    if image.format == "tiff":
        import tifffile

        tifffile.imwrite(path, mask)
    elif image.format == "npy":
        with open(path, "wb") as f:  # np.save(path) would append .npy to a name without it
            np.save(f, mask)
    else:
        nibabel = _nibabel()
        header = image.nifti.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(None, None)  # labels are stored as they are, not rescaled
        nibabel.save(type(image.nifti)(mask, image.nifti.affine, header), path)


def _nibabel():
    try:
        import nibabel
    except ModuleNotFoundError:
        raise DataError('reading NIfTI needs nibabel: pip install "qseg[nifti]"') from None
    return nibabel
