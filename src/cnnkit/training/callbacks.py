"""What a training run tells whoever watches it: the trackers (tracking.py: TensorBoard, MLflow) and
`cnnkit tune`'s pruner. A Callback's hooks do nothing by default; a watcher overrides the ones it needs.

    on_train_start(cfg, run, first_epoch)   before the first epoch of this process (first_epoch > 1 on --resume)
    on_step(step, values)                   after an optimizer step: step counts from 1 over the whole run;
                                            values: {"loss", "accuracy" (of this batch), "lr"}; every step on a
                                            CPU, every PROGRESS_EVERY steps on a GPU (each read syncs it)
    on_epoch_end(epoch, row)                after the epoch's history row and checkpoint are written: row is
                                            history.csv's (epoch, train_loss, train_acc, val_loss, val_acc, lr,
                                            seconds). An exception raised here stops the run, its checkpoint
                                            kept (tune's pruning); the epoch loop lets it through unchanged
    on_train_end(result)                    after the test, the model file and the report: a jobs.train.RunResult
    close()                                 always, last, whether the run finished, failed or was stopped

In a torchrun job every process calls on_step / on_epoch_end, so a watcher that writes is given to rank 0 only
(jobs/train.py builds the trackers where world.primary).
"""
from __future__ import annotations

from typing import Any


class Callback:
    def on_train_start(self, cfg: Any, run: Any, first_epoch: int) -> None:
        pass

    def on_step(self, step: int, values: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, epoch: int, row: dict[str, float]) -> None:
        pass

    def on_train_end(self, result: Any) -> None:
        pass

    def close(self) -> None:
        pass
