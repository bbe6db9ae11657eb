"""The 48x48 grayscale stage: resize the normalized images to the classifier's input size.

Gray unless ingest.color=rgb: then the images stay RGB (uint8 [N, S, S, 3]), each channel resized
alike, and the ingest file's attrs (its color among them) carry over.

The ingest array is read and written in blocks of rows (``ferpipe.store.read_blocks`` /
``h5_writer``): a dataset larger than memory (AffectNet at 224 px) never has to fit.
"""
from __future__ import annotations

from ferpipe.imaging import resize_batch
from ferpipe.plots import grid, sample_indices, sheet_images, write_png
from ferpipe.store import h5_writer, read_attrs, read_blocks, read_h5, writes


@writes("out_path", "sheet_path")
def run_gray(images_path: str, out_path: str, sheet_path: str | None, size: int = 48) -> dict:
    ids = read_h5(images_path, ["ids"])["ids"]
    if not len(ids):
        raise ValueError(f"{images_path} holds no images (rerun ingest)")
    attrs = read_attrs(images_path)
    with h5_writer(out_path, attrs, rows=len(ids)) as out:
        for _, block in read_blocks(images_path, "images"):
            out.append("images", resize_batch(block, size))
        # the ingest size is kept: inference must repeat both resizes (ingest's, then this one)
        out.attrs.update(stage="gray48", size=size, ingest_size=int(attrs.get("size", block.shape[1])))
        out.write("ids", ids)
        sheet = sheet_images(out.read("images", sample_indices(len(ids), 32))) if sheet_path else None
    if sheet is not None:
        write_png(sheet_path, grid([sheet[:16], sheet[16:]], cell=64))
    return {"images": int(len(ids)), "size": size}
