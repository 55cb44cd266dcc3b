"""segflow: semantic segmentation of images larger than memory.

The library knows nothing of Prefect; the flows in ``flows/`` call it.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
