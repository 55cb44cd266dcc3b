"""Do two checkouts segment the same? Outputs of segment_region, hashed, side by side.

    python benchmarks/compare_outputs.py REV [--keep DIR]

For restructurings that must not change behaviour: checks REV out in a temporary git
worktree, runs segment_region in a subprocess against each checkout (REV's package first on
``PYTHONPATH``) with one fixed, seeded checkpoint on the bundled SpaceNet chip, in ``crop``
and ``gaussian`` mode, with polygons and probabilities. Then it compares the sha256 of the
class COG and the probability COG files, the labels and probabilities in the prediction
store, the polygons (WKB and attributes; a GeoPackage file holds timestamps, so it is not
compared as bytes), the georeference and the class pixel counts. Prints one row per item,
and exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHIP = ROOT / "data" / "samples" / "spacenet_atlanta" / "sample_geotiff.tif"

RUN = r"""
import hashlib, json, sys
from pathlib import Path
import geopandas as gpd, numpy as np, rasterio, torch
import segflow
from segflow.config import ClassDef
from segflow.io.store import SceneStore
from segflow.segment import SegmentRequest, segment_region
from segflow.train.checkpoint import build_meta, save_checkpoint
from segflow.train.models import ModelConfig, build_model

out, chip = Path(sys.argv[1]), sys.argv[2]
sha = lambda b: hashlib.sha256(b).hexdigest()
cfg = ModelConfig(arch="unet", in_channels=1, out_channels=2, features=8, depth=2,
                  num_res_units=1)
torch.manual_seed(0)
classes = (ClassDef(id=0, name="background"), ClassDef(id=1, name="building"))
meta = build_meta(cfg, bands=("pan",), mean=[450.0], std=[250.0], tile=256, classes=classes)
save_checkpoint(out / "ck", build_model(cfg).eval(), meta)
res = {"package": segflow.__file__}
for mode in ("crop", "gaussian"):
    d = out / mode
    d.mkdir()
    r = segment_region(SegmentRequest(
        image=chip, model=str(out / "ck"), out=str(d / "m.tif"), polygons=str(d / "m.gpkg"),
        probabilities=str(d / "p.tif"), tile=256, mode=mode))
    with rasterio.open(d / "m.tif") as a:
        georef = str((a.crs.to_epsg(), tuple(a.transform)))
    g = gpd.read_file(d / "m.gpkg")
    st = SceneStore.open(d / "m.predictions.zarr")
    res[mode] = {
        "class COG file": sha((d / "m.tif").read_bytes()),
        "probability COG file": sha((d / "p.tif").read_bytes()),
        "store labels": sha(np.asarray(st.array("prediction/labels")[...]).tobytes()),
        "store probabilities": sha(
            np.asarray(st.array("prediction/probabilities")[...]).tobytes()),
        "polygons": sha(b"".join(g.geometry.to_wkb())
                        + g.drop(columns="geometry").to_csv().encode()),
        "polygon count": len(g),
        "georeference": georef,
        "class pixels": r.class_pixels,
    }
(out / "result.json").write_text(json.dumps(res, sort_keys=True))
"""


def run(package_root: Path, out: Path) -> dict:
    """segment_region outputs of the package under ``package_root``, hashed."""
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    subprocess.run([sys.executable, "-c", RUN, str(out), str(CHIP)], check=True, env=env,
                   cwd=out)  # fmt: skip
    doc = json.loads((out / "result.json").read_text())
    assert Path(doc.pop("package")).parent.parent == package_root, "wrong segflow imported"
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rev", help="the commit to compare the working tree with")
    ap.add_argument("--keep", help="keep the outputs in this directory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="segflow-compare-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree),
                        args.rev], check=True)  # fmt: skip
        try:
            before = run(tree, work / "before")
            after = run(ROOT, work / "after")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           check=False)  # fmt: skip
    differ = 0
    print(f"| mode | output | {args.rev} vs working tree |")
    print("|---|---|---|")
    for mode, items in before.items():
        for name, value in items.items():
            same = after[mode][name] == value
            differ += not same
            print(f"| {mode} | {name} | {'identical' if same else 'DIFFERENT'} |")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
