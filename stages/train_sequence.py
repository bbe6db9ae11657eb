"""Stage train_sequence: LSTM / Deep RNN (context-bridge) / per-frame models on a features file.

Subject-independent k-fold at the sequence level (test fold i, validation fold i+1 for early stopping,
the rest trains); metrics per fold and mean +- std (accuracy, macro-F1, AUC, accuracy after the first
k frames; MSE and Pearson r for regression), a pooled confusion matrix PNG, out-of-fold predictions,
dvclive curves per fold, and a final model (all folds but fold 0, which validates) saved for
--test-only. Samples: windows of --rho frames (target = the window's last frame) or, with rho 0,
whole sequences left-padded and masked (many-to-one). --anticipation-first k (or a fraction) trains
and evaluates from the first k frames with the monotone true-class loss.

Settings come from params.yaml `sequence:` (model, task, rho, max_len, encoder*, folds, lstm/cbm/frame,
train{lr, weight_decay, batch_size, epochs, patience, clip, balanced, augment, shift, select, seed, final,
device, threads, eval_batch_size, snapshot_every, plot_every}, anticipation{first, weight}). Command line:
paths, plus -S KEY=VALUE with the full params.yaml key for this run only, as `dvc exp run -S` takes it
(python stages/train_sequence.py -S sequence.model=cbm -S sequence.train.epochs=15 -S sequence.lstm.hidden=64).
eval_batch_size: the validation and test passes' batch. Snapshots every train.snapshot_every epochs in
.ferpipe/snapshots/train_sequence/: a stopped run resumes there when run again with the same settings and
data (rm -r .ferpipe/snapshots starts fresh). Task regress: a predicted-vs-true scatter every
train.plot_every epochs per fold in the dvclive folder.

--test-only applies a saved model (--model-in) to --features and writes its outputs to --outputs (HDF5).
"""
from ferpipe.params import add_set_option, lookup, stage_params
from ferpipe.sequences.config import SequenceConfig
from ferpipe.sequences.train import run_test_only, run_train_sequence
from ferpipe.stagecli import run_stage, stage_parser


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--features", default="data/sequences/features.h5", help="features HDF5 (features stage)")
    p.add_argument("--model-out", default="data/sequences/model.pt", help="final model (.pt)")
    p.add_argument("--metrics", default="metrics/sequence.json", help="all metrics: per fold, pooled, by first k frames")
    p.add_argument("--results", default="metrics/sequence_results.json",
                   help="the one-screen summary, the DVC metrics file ('' for none)")
    p.add_argument("--plots", default="plots/sequence", help="folder for confusion.png ('' for none)")
    p.add_argument("--predictions", default="data/sequences/predictions.csv", help="out-of-fold predictions ('' for none)")
    p.add_argument("--live", default="dvclive/sequence", help="dvclive root, one folder per fold and final ('' for none)")
    p.add_argument("--params", default="params.yaml", help="params file")
    add_set_option(p, "sequence.train.epochs=15")
    p.add_argument("--test-only", action="store_true", help="apply --model-in to --features, write --outputs")
    p.add_argument("--model-in", help="saved sequence model for --test-only (default: --model-out)")
    p.add_argument("--outputs", default="data/sequences/test_outputs.h5", help="--test-only outputs HDF5")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    if a.test_only:
        if a.set:
            p.error(f"-S {a.set[0]}: --test-only reads no params (the saved model holds its settings)")
        print(run_test_only(a.model_in or a.model_out, a.features, a.outputs, a.metrics or None))
        return
    params = stage_params(p, a.params, a.set, reads=("sequence.*",),  # but not SequenceConfig.OTHER_STAGES':
                          others=("sequence.dataset.*", "sequence.features.*", "sequence.landmarks_passes"))
    cfg = SequenceConfig.from_params(lookup(params, "sequence"))
    result = run_train_sequence(a.features, a.model_out, a.metrics, a.plots or None, a.predictions or None,
                                a.live or None, cfg, results_path=a.results or None)
    keep = ("model", "sequences", "mean", "std", "by_first_k", "seconds")
    print({k: result[k] for k in keep if k in result})


if __name__ == "__main__":
    run_stage(main)
