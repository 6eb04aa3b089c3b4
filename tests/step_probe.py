"""Runs the trainer's training step and the layout checker's step on the same job, for
tests/test_training.py::test_trainer_and_layout_checker_run_the_same_step.

With PERTURB_STEP=1 in the environment, the step's loss function (in
``megatron_patch.training.step``) returns twice the loss. The patch is applied when this file is
imported: in this process for the trainer, and in the checker's spawned ranks too, which import
the parent's main script again (as ``__mp_main__``) before they run.

    python tests/step_probe.py TOKENIZER TRAIN_PREFIX VALID_PREFIX   -> prints a JSON line
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megatron_patch.training.step as step  # noqa: E402

if os.environ.get("PERTURB_STEP") == "1":
    _original = step._loss_func

    def _doubled(loss_mask, output):
        loss, report = _original(loss_mask, output)
        return 2 * loss, {name: 2 * value for name, value in report.items()}

    step._loss_func = _doubled


def main(tokenizer: str, train: str, valid: str) -> None:
    from megatron_patch.distributed import Layout, shutdown
    from megatron_patch.parallel_check.runner import make_global_batch, run_layout
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.trainer import Trainer

    job = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                      "--num-experts", "4", "--seq-length", "16", "--micro-batch-size", "2",
                      "--global-batch-size", "4", "--train-iters", "2", "--lr-warmup-iters", "1",
                      "--moe-ortho-loss-coeff", "0.1", "--moe-var-loss-coeff", "0.1",
                      "--data-path", train, "--valid-data-path", valid,
                      "--tokenizer-model", tokenizer, "--no-progress-bar"])
    trainer = Trainer(job)
    trainer.resume()
    trainer.build_datasets()
    trained, _ = trainer.train_step()
    vocab = trainer.tokenizer.vocab_size
    shutdown()
    checked = run_layout(Layout(), job, make_global_batch(4, 16, vocab), vocab, backend="gloo")
    print(json.dumps({"trainer": trained.lm_loss, "checker": checked.lm_loss}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
