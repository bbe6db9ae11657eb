"""The 48x48 grayscale stage: resize the normalized images to the classifier's input size."""
from __future__ import annotations

from ferpipe.imaging import resize_batch
from ferpipe.plots import grid, sample_indices, write_png
from ferpipe.store import read_attrs, read_h5, write_h5, writes


@writes("out_path", "sheet_path")
def run_gray(images_path: str, out_path: str, sheet_path: str | None, size: int = 48) -> dict:
    data = read_h5(images_path, ["images", "ids"])
    out = resize_batch(data["images"], size)
    attrs = read_attrs(images_path)
    # the ingest size is kept: inference must repeat both resizes (ingest's, then this one)
    attrs.update(stage="gray48", size=size, ingest_size=int(attrs.get("size", data["images"].shape[-1])))
    write_h5(out_path, {"images": out, "ids": data["ids"]}, attrs)
    if sheet_path:
        idx = sample_indices(len(out), 32)
        write_png(sheet_path, grid([out[idx[:16]], out[idx[16:]]], cell=64))
    return {"images": int(len(out)), "size": size}
