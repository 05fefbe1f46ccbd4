"""What a run reports while it trains: one short progress line per logging step, on the main process only."""

import logging
import sys
import time

from transformers import TrainerCallback

LOGGER_NAME = "vlora_hf"


def setup_logging(training_args) -> logging.Logger:
    """The package's log lines go to stdout as `[vlora-hf train] ...`: info on the process that logs (the main
    one), warnings only on the others, so a multi-process run prints each line once."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[vlora-hf train] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    return logger


class ProgressCallback(TrainerCallback):
    """step, loss, learning rate and elapsed seconds at every logging step (replaces the Trainer's dict print)."""

    def __init__(self):
        self.logger = logging.getLogger(LOGGER_NAME)
        self.start = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            self.logger.info(f"step {state.global_step}/{state.max_steps} loss {float(logs['loss']):.4f} "
                             f"lr {float(logs.get('learning_rate', 0)):.2e} {time.time() - self.start:.0f} s")


__all__ = ["ProgressCallback", "setup_logging"]
