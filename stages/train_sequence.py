"""Stage train_sequence: LSTM / Deep RNN (context-bridge) / per-frame models on a features file.

Subject-independent k-fold at the sequence level (test fold i, validation fold i+1 for early stopping,
the rest trains); metrics per fold and mean +- std (accuracy, macro-F1, AUC, accuracy after the first
k frames; MSE and Pearson r for regression), a pooled confusion matrix PNG, out-of-fold predictions,
dvclive curves per fold, and a final model (all folds but fold 0, which validates) saved for
--test-only. Samples: windows of --rho frames (target = the window's last frame) or, with rho 0,
whole sequences left-padded and masked (many-to-one). --anticipation-first k (or a fraction) trains
and evaluates from the first k frames with the monotone true-class loss.

Defaults come from params.yaml `sequence:` when it exists (keys: model, task, rho, max_len, encoder,
encoder_width, encoder_init, folds, lstm{hidden,depth,dropout}, cbm{hidden,depth,shortcut,kernel,temporal_dropout,
dropout}, frame{hidden,dropout}, train{lr,weight_decay,batch_size,epochs,patience,clip,balanced,augment,
shift,seed,threads,final}, anticipation{first,weight}); every value can be given on the command line.

--test-only applies a saved model (--model-in) to --features and writes its outputs to --outputs (HDF5).
"""
import argparse

from ferpipe.params import params_section
from ferpipe.sequences.models import ENCODERS, KINDS
from ferpipe.sequences.train import TASKS, SequenceConfig, run_test_only, run_train_sequence
from ferpipe.stagecli import run_stage, stage_parser


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--features", default="data/sequences/features.h5", help="features HDF5 (features stage)")
    p.add_argument("--model-out", default="data/sequences/model.pt", help="final model (.pt)")
    p.add_argument("--metrics", default="metrics/sequence.json", help="all metrics: per fold, pooled, by first k frames")
    p.add_argument("--results", default="metrics/sequence_results.json",
                   help="the one-screen summary, the DVC metrics file ('' for none)")
    p.add_argument("--plots", default="plots/sequence", help="folder for confusion.png ('' for none)")
    p.add_argument("--predictions", default="data/sequences/predictions.csv", help="out-of-fold predictions ('' for none)")
    p.add_argument("--live", default="dvclive/sequence", help="dvclive folder ('' for none)")
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--test-only", action="store_true", help="apply --model-in to --features, write --outputs")
    p.add_argument("--model-in", help="saved sequence model for --test-only (default: --model-out)")
    p.add_argument("--outputs", default="data/sequences/test_outputs.h5", help="--test-only outputs HDF5")
    g = p.add_argument_group("model and training (override params.yaml sequence:)")
    g.add_argument("--model", choices=KINDS)
    g.add_argument("--task", choices=TASKS)
    g.add_argument("--rho", type=int, help="window length (0 = whole sequences, masked many-to-one)")
    g.add_argument("--max-len", type=int, help="whole sequences: keep the last N frames (0 = all)")
    g.add_argument("--encoder", choices=ENCODERS, help="frame encoder for raw frames (features mode images)")
    g.add_argument("--encoder-width", type=int)
    g.add_argument("--encoder-init", help="simple encoder: start from this CNN checkpoint (e.g. the image stage's)")
    g.add_argument("--hidden", type=int, help="hidden size / channels of the chosen model")
    g.add_argument("--depth", type=int, help="layers of the chosen model (lstm, cbm)")
    g.add_argument("--dropout", type=float)
    g.add_argument("--shortcut", type=int, help="cbm: a shortcut every N layers (0 = none)")
    g.add_argument("--temporal-dropout", type=float, help="cbm: probability of detaching x in the control branch")
    g.add_argument("--folds", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--epochs", type=int)
    g.add_argument("--patience", type=int, help="stop when epochs since the best validation loss > patience")
    g.add_argument("--clip", type=float, help="gradient-norm clipping (0 = none)")
    g.add_argument("--balanced", type=_bool, help="class-balanced cross-entropy weights (true/false)")
    g.add_argument("--augment", type=_bool, help="random flip + shift of raw frames (true/false)")
    g.add_argument("--seed", type=int)
    g.add_argument("--threads", type=int, help="torch threads (0 = default)")
    g.add_argument("--anticipation-first", type=float, help="train/evaluate from the first k frames (or a fraction)")
    g.add_argument("--anticipation-weight", type=float, help="weight of the monotone true-class hinge")
    g.add_argument("--no-final", action="store_true", help="skip training the saved final model")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    if a.test_only:
        print(run_test_only(a.model_in or a.model_out, a.features, a.outputs, a.metrics or None))
        return
    sec = params_section(a.params, "sequence") or {}
    over = {k: getattr(a, k) for k in ("model", "task", "rho", "max_len", "encoder", "encoder_width", "encoder_init", "folds",
                                        "lr", "weight_decay", "batch_size", "epochs", "patience", "clip",
                                        "balanced", "augment", "seed", "threads", "anticipation_first",
                                        "anticipation_weight")}
    if a.no_final:
        over["final"] = False
    cfg = SequenceConfig.from_params(sec, **over)
    group = getattr(cfg, cfg.model)
    for key in ("hidden", "depth", "dropout", "shortcut", "temporal_dropout"):
        if getattr(a, key) is not None:
            if key not in getattr(SequenceConfig(), cfg.model) and key not in ("hidden", "dropout"):
                p.error(f"--{key.replace('_', '-')} does not apply to model {cfg.model}")
            group[key] = getattr(a, key)
    cfg.validate()
    result = run_train_sequence(a.features, a.model_out, a.metrics, a.plots or None, a.predictions or None,
                                a.live or None, cfg, results_path=a.results or None)
    keep = ("model", "sequences", "mean", "std", "by_first_k", "seconds")
    print({k: result[k] for k in keep if k in result})


if __name__ == "__main__":
    run_stage(main)
