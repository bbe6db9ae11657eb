"""Sequences: the LSTM-on-CNN system and the Deep RNN framework as pipeline stages.

* ``ferpipe.data.sequences``   readers ``ck_sequences`` and ``video`` (frames go through ingest/gray48/landmarks)
* ``features``                 a trained CNN's layer (or the raw frames) -> HDF5 in the LSTM-on-CNN layout
* ``models``                   LSTMNet, CBMNet (context-bridge cells), FrameNet (single-frame baseline)
* ``train``                    windows / masked whole sequences, subject-independent k-fold, metrics, --test-only
* ``anticipation``             first-k-frames training with the monotone true-class loss, accuracy per k
"""
