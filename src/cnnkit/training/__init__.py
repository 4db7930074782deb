"""Training, and only training: data and model in, the best model by validation accuracy out.

    session.py   load_data_and_model(cfg): the dataset and the model fitted to it;
                 setup(cfg, ds, model, run): precision, preprocessing, pretrained weights, transfer
                 phases, augmentation, the optimizer, resume state -> a Session
    loop.py      epoch_loop(session): train one epoch, validate, keep the best model, checkpoint; repeat;
                 fit(...): the above, returning a TrainResult (model, history, best epoch)
    epoch.py     run_epoch(model, optimizer, images, labels, order, EpochSettings): one pass
    optim.py     the optimizer, learning-rate schedules, transfer phases, weight averages (EMA, Lookahead)
    svm.py       train_svm(...): the notes' linear-SVM baseline, returning the same TrainResult
    lr_find.py   find_lr(cfg, ds, model): the exponential learning-rate sweep (Smith 2015, fastai's lr_find),
                 the weights restored afterwards, and its suggestion: a Sweep; resolve_auto_lr for `--lr auto`

Batches are sliced from the dataset's uint8 tensors by a shuffled index and preprocessed on the whole
batch; bf16 autocast (where this machine measures it faster: hardware.py) and channels-last
activations are on by default (benchmarks/NOTES.md). Testing, calibration and the report are the
run's next steps (jobs/train.py); this package imports none of them. Every file goes through the
RunFolder, which knows whether this process writes.
"""
from .epoch import EpochSettings, run_epoch
from .loop import epoch_loop, fit
from .lr_find import Sweep, find_lr, resolve_auto_lr
from .optim import lr_at, make_optimizer, update_ema
from .session import Session, TrainResult, augmentation_and_balance, load_data_and_model, setup
from .svm import train_svm

__all__ = ["EpochSettings", "Session", "Sweep", "TrainResult", "augmentation_and_balance", "epoch_loop", "find_lr",
           "fit", "load_data_and_model", "lr_at", "make_optimizer", "resolve_auto_lr", "run_epoch", "setup",
           "train_svm", "update_ema"]
