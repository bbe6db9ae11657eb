"""Training: the loop with early stopping, DDP and AMP (loop), k-fold cross-validation + final model
+ transfer learning (run), the training rows' statistics and preprocessing record (data).
Batches come from ``ferpipe.data.tensors`` (packed arrays in memory) and ``ferpipe.data.augment``;
checkpoints are written with ``ferpipe.models.checkpoint.save_checkpoint``.

A checkpoint's ``meta["input"]`` says how to feed its model; ``ferpipe.models.inputs.prepare_input``
turns uint8 images (and guide maps) into the tensors ``model(image, guide)`` expects.
"""
