"""Evaluation on the held-out test split: metrics (accuracy, macro-F1, balanced accuracy, top-k,
per class), predictions tables, confusion and worst-error pictures (plots), fold-model averaging
and test-time augmentation (run), and ensembles of saved predictions across experiments (ensemble).
"""
