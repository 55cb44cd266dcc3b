"""GDAL PAM sidecars (``<path>.aux.xml``): the class COG's category names, for QGIS's legend.

Written by hand: rasterio has no binding for ``GDALSetRasterCategoryNames``, and the GTiff
driver keeps category names in its PAM sidecar anyway (the ``.aux.xml`` format is GDAL's
documented "Persistable Auxiliary Metadata"). QGIS up to 3.28 reads no raster attribute table:
the labels of its paletted renderer's classes are the band's category names (a list indexed by
pixel value; an empty name shows the value itself).

Internal module; the public API is re-exported by :mod:`segflow.io.export`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from segflow.atomic import atomic_output
from segflow.outputs import sidecar_paths

__all__ = ["category_names_xml", "pam_sidecar", "pam_sidecar_path"]

# characters XML 1.0 cannot hold, even escaped
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def pam_sidecar_path(path: str | Path) -> Path:
    """The PAM sidecar of the GDAL raster ``path``: ``<path>.aux.xml``."""
    return sidecar_paths(path)[0]


def category_names_xml(names: Sequence[str]) -> str:
    """A PAM document giving band 1 the category ``names``, indexed by pixel value.

    Examples
    --------
    >>> print(category_names_xml(["", "a & b"]))
    <PAMDataset>
      <PAMRasterBand band="1">
        <CategoryNames>
          <Category />
          <Category>a &amp; b</Category>
        </CategoryNames>
      </PAMRasterBand>
    </PAMDataset>
    <BLANKLINE>
    """
    import xml.etree.ElementTree as ET

    root = ET.Element("PAMDataset")
    band = ET.SubElement(ET.SubElement(root, "PAMRasterBand", band="1"), "CategoryNames")
    for name in names:  # ElementTree escapes the markup characters
        ET.SubElement(band, "Category").text = _NOT_XML.sub("\ufffd", name)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


@contextlib.contextmanager
def pam_sidecar(path: Path, names: Sequence[str] | None) -> Iterator[Callable[[], None]]:
    """Yield the function that publishes the sidecar of ``path``; undo it if the block fails.

    Call it just before the raster is moved into place, inside this block: the sidecar (the
    category ``names``, or none at all where ``names`` is ``None``: an older sidecar describes
    the file being replaced) is in place first and the raster is the last file to appear. If
    the block then fails (the raster is not published), the new sidecar is removed.
    """
    sidecar = pam_sidecar_path(path)
    published = False

    def publish() -> None:
        nonlocal published
        if names is None:
            sidecar.unlink(missing_ok=True)
            return
        with atomic_output(sidecar) as tmp, tmp.open("wb") as fh:  # temporary name, os.replace
            fh.write(category_names_xml(names).encode("utf-8"))  # GDAL reads UTF-8
            fh.flush()
            os.fsync(fh.fileno())
        published = True

    try:
        yield publish
    except BaseException:
        if published:
            sidecar.unlink(missing_ok=True)
        raise
