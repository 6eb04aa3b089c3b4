"""The Trainer: one object over a ``JobConfig`` that builds each component from its section, then
resumes, calibrates, trains, evaluates and saves.

    Trainer(job)      process groups (job.parallel), the --save lock, tokenizer and its data
                      records (job.data), model (job.model,
                      job.moe, job.losses), optimizer and schedule (job.optimizer, OMoE from
                      job.orthogonal_optimizer)
    .fit()            resume (job.checkpoint) -> datasets -> loop: [calibrate]
                      train_step, log, [evaluate], [save], stop on SIGTERM/SIGUSR1 or
                      --exit-interval -> summary
    .train_step()     ``step.forward_backward`` (the function the layout checker runs) ->
                      finiteness check -> optimizer and LR schedule step -> logged scalars
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_patch.data.datasets import build_train_valid_datasets, parse_data_path
from megatron_patch.data.instructions import build_instruction_datasets, is_instruction_dataset
from megatron_patch.data.provenance import check_provenance, tokenizer_fingerprint
from megatron_patch.data.tokenizer import load_tokenizer
from megatron_patch.distributed import (
    decided_on_rank0,
    init_model_parallel,
    init_world,
    world_from_environment,
)
from megatron_patch.moe.calibration import needs_calibration, reconcile_coefficients
from megatron_patch.moe.coefficients import recording_only
from megatron_patch.moe.routing_stats import RoutingStatistics
from megatron_patch.optimizer.orthogonal import OrthogonalExpertOptimizer
from megatron_patch.training.checkpoint_files import (
    RunLock,
    RunLockError,
    latest_iteration,
    prune_stale_saves,
)
from megatron_patch.training.checkpointing import load_checkpoint, model_signature, save_checkpoint
from megatron_patch.training.config import JobConfig
from megatron_patch.training.logger import MetricsLogger
from megatron_patch.training.lora import adapter_parameters
from megatron_patch.training.model import build_model
from megatron_patch.training.optimizer import build_optimizer
from megatron_patch.training.step import (
    BatchShape,
    StepOutput,
    calibrate,
    check_finite,
    forward_backward,
    micro_batches,
    run_schedule,
    unwrap,
)


class ExitSignal:
    """Remembers SIGTERM/SIGUSR1 (slurm preemption); all ranks agree on it once per step."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum


def any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` OR-reduced over all ranks (e.g. a pipeline stage without MoE layers)."""
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def step_scalars(output: StepOutput, grad_norm, lr: float, tokens_per_s: float) -> dict[str, float]:
    """The headline scalars of a step: LM loss, MoE losses (mean over MoE layers), MaxVio..."""
    scalars = {"lm_loss": output.lm_loss, "lr": lr, "tokens_per_s": tokens_per_s}
    if grad_norm is not None:
        scalars["grad_norm"] = float(grad_norm)
    for name, per_layer in output.moe_losses.items():
        moe_layers = per_layer[per_layer != 0]
        scalars[name] = float(moe_layers.mean()) if moe_layers.numel() else 0.0
    scalars["max_vio"] = float(output.routing["max_vio"].mean())
    scalars["routing_entropy"] = float(output.routing["entropy"].mean())
    return scalars


def per_layer_scalars(output: StepOutput) -> dict[str, float]:
    """Every MoE loss, MaxVio, entropy and expert load per MoE layer."""
    scalars = {}
    for name, per_layer in output.moe_losses.items():
        for i, value in enumerate(per_layer.tolist()):
            scalars[f"{name}_layer_{i}"] = value
    routing = output.routing
    for i, (vio, ent, load) in enumerate(zip(routing["max_vio"].tolist(),
                                             routing["entropy"].tolist(), routing["load"])):
        scalars[f"max_vio_moe_layer_{i}"] = vio
        scalars[f"routing_entropy_moe_layer_{i}"] = ent
        for e, share in enumerate(load.tolist()):
            scalars[f"load_moe_layer_{i}_expert_{e}"] = share
    return scalars


class Trainer:
    """Builds the job's components; ``fit`` runs it (see the module docstring)."""

    def __init__(self, job: JobConfig) -> None:
        self.exit_signal = ExitSignal()  # before any slow set-up: an early preemption is kept
        self.job = job
        _, world_size, _ = world_from_environment()
        self.layout = job.validate(world_size)
        self.device = init_world(job.parallel.distributed_backend)
        self.pg_collection = init_model_parallel(self.layout, job.training.seed)
        self.run_lock, self.messages = self._lock()  # before anything is written to --save
        try:
            self._build()
        except BaseException:
            self.release()
            raise

    def _build(self) -> None:
        job = self.job
        self.tokenizer = load_tokenizer(job.data.tokenizer_model)
        fingerprint = tokenizer_fingerprint(job.data.tokenizer_model)
        self.messages += check_provenance(self._data_prefixes(), job.data.tokenizer_model,
                                          fingerprint)
        self.model = build_model(job, self.tokenizer.vocab_size)
        if job.lora.enabled:
            total = sum(p.numel() for p in self.model[0].parameters())
            trainable = adapter_parameters(self.model[0])
            self.messages.append(
                f"LoRA rank {job.lora.lora_rank} on {', '.join(job.lora.lora_targets)}: "
                f"{trainable} of {total} parameters of this rank train "
                f"({100 * trainable / total:.2f}%)")
        self.config = unwrap(self.model[0]).config
        self.optimizer, self.scheduler = build_optimizer(job, self.model)
        if job.orthogonal_optimizer.enabled:
            self.optimizer = OrthogonalExpertOptimizer(
                self.optimizer, self.model, job.orthogonal_optimizer, self.pg_collection)
        self.shape = BatchShape(job.num_microbatches(self.layout),
                                job.training.micro_batch_size, job.model.seq_length)
        self.signature = model_signature(job, self.tokenizer.vocab_size, fingerprint)
        self.routing_statistics = RoutingStatistics(
            self.config.num_layers, job.moe.num_experts, self.device).attach(self.model)
        self.iteration = 0
        self.consumed_samples = 0
        self.train_ds = self.valid_ds = None
        self.logger: Optional[MetricsLogger] = None
        self.uncalibrated = False

    def _batches(self, dataset, first_sample: int, num_microbatches: Optional[int] = None):
        shape = self.shape if num_microbatches is None else BatchShape(
            num_microbatches, self.shape.micro_batch_size, self.shape.seq_length)
        return micro_batches(dataset, first_sample, shape, self.pg_collection, self.device)

    def resume(self) -> list[str]:
        """Load ``--load`` (or, for an interrupted fine-tuning or ``--hf-load`` job, its own
        ``--save``); make the loss coefficients follow this run's flags. Returns what to tell the
        user. A ``--hf-load`` job starts from the weights the model was built with."""
        checkpoint = self.job.checkpoint
        messages = []
        load_dir, finetune = checkpoint.load, checkpoint.finetune
        starts_fresh = "--finetune" if finetune else "--hf-load" if checkpoint.hf_load else None
        if starts_fresh and checkpoint.save and latest_iteration(checkpoint.save) is not None:
            # A fine-tuning or post-training job that was interrupted: continue it rather than
            # start it again from the weights it started from.
            load_dir, finetune = checkpoint.save, False
            messages.append(f"{starts_fresh}: --save {checkpoint.save} already holds this run's "
                            "checkpoints; resuming them instead of starting again from "
                            f"{'--load' if starts_fresh == '--finetune' else '--hf-load'}")
        if load_dir:
            restored = load_checkpoint(load_dir, self.model, self.optimizer, self.scheduler,
                                       signature=self.signature, finetune=finetune,
                                       fallback=not checkpoint.no_checkpoint_fallback)
            messages += restored.messages
            self.iteration, self.consumed_samples = restored.iteration, restored.consumed_samples
            if restored.path is not None:
                start = "fine-tuning from its weights, at iteration 0" if finetune else (
                    f"resuming at iteration {self.iteration}")
                messages.append(f"loaded {restored.path}: {start}")
            saved = restored.saved_job.losses if restored.saved_job is not None else None
            messages += reconcile_coefficients(self.model, self.config, saved, fresh=finetune)
        if self.job.orthogonal_optimizer.enabled:
            self.optimizer.start_at(self.iteration)
        self.uncalibrated = any_rank(needs_calibration(self.model), self.device)
        return messages

    def _data_prefixes(self) -> list[str]:
        data = self.job.data
        prefixes = parse_data_path(data.data_path)[0]
        if data.valid_data_path:
            prefixes += parse_data_path(data.valid_data_path)[0]
        return prefixes

    def build_datasets(self) -> None:
        """The training and validation samples of the whole run (``job.data``): text
        (megatron's GPT datasets) or instruction data (``data.instructions``)."""
        job = self.job
        if is_instruction_dataset(parse_data_path(job.data.data_path)[0][0]):
            self.train_ds, self.valid_ds = build_instruction_datasets(
                job.data.data_path, job.data.split, job.model.seq_length, job.training.seed,
                train_samples=job.training.train_iters * job.training.global_batch_size,
                valid_samples=max(job.training.eval_iters, 1) * job.training.global_batch_size,
                tokenizer=self.tokenizer, valid_data_path=job.data.valid_data_path)
            return
        self.train_ds, self.valid_ds = build_train_valid_datasets(
            job.data.data_path, job.data.split, job.model.seq_length, job.training.seed,
            train_samples=job.training.train_iters * job.training.global_batch_size,
            valid_samples=max(job.training.eval_iters, 1) * job.training.global_batch_size,
            tokenizer=self.tokenizer, valid_data_path=job.data.valid_data_path,
            cache_path=job.data.data_cache_path, is_built_on_rank=lambda: True,
        )

    def _lock(self) -> tuple[Optional[RunLock], list[str]]:
        """Take ``--save``'s lock (global rank 0; collective) and remove saves a crash
        interrupted; returns the lock and what to tell the user.

        Raises:
            RunLockError: another run writes the directory (on every rank).
        """
        save = self.job.checkpoint.save
        if not save:
            return None, []
        lock = RunLock(save)

        def take() -> list[str]:
            replaced = lock.acquire()
            stale = prune_stale_saves(save)
            return [replaced] * bool(replaced) + [
                f"removed {path.name}, a save that was interrupted" for path in stale]

        return lock, decided_on_rank0(take, RunLockError)

    def release(self) -> None:
        """Give ``--save``'s lock up (the job is over, or failed)."""
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def calibrate(self) -> dict[str, float]:
        """Calibrate the "auto" coefficients on the next global batch (collective)."""
        coefficients = calibrate(self.model, self._batches(self.train_ds, self.consumed_samples),
                                 self.shape, self.pg_collection)
        self.uncalibrated = False
        return coefficients

    def train_step(self) -> tuple[StepOutput, dict[str, float]]:
        """One optimizer step on the next global batch; returns what it reports and the scalars
        to log. Before calibration ('auto' with --moe-loss-calibration-iters) the specialization
        losses are only logged."""
        start = time.perf_counter()
        self.optimizer.zero_grad()
        with recording_only(self.model) if self.uncalibrated else contextlib.nullcontext():
            output = forward_backward(
                self.model, self._batches(self.train_ds, self.consumed_samples), self.shape,
                self.pg_collection, self.routing_statistics)
        check_finite(output.lm_loss, self.iteration + 1, self.model,
                     (lambda: next(self._batches(self.train_ds, self.consumed_samples, 1)))
                     if self.layout.pp == 1 else None)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed_samples += self.job.training.global_batch_size
        tokens = self.job.training.global_batch_size * self.job.model.seq_length
        scalars = step_scalars(output, grad_norm, self.optimizer.param_groups[0]["lr"],
                               tokens / (time.perf_counter() - start))
        return output, scalars

    def evaluate(self) -> float:
        """Mean LM loss over ``--eval-iters`` validation global batches (forward only)."""
        for chunk in self.model:
            chunk.eval()
        global_batch = self.job.training.global_batch_size
        losses = []
        with torch.no_grad():
            for i in range(self.job.training.eval_iters):
                losses.append(run_schedule(self.model, self._batches(self.valid_ds, i * global_batch),
                                           self.shape, self.pg_collection, forward_only=True))
        for chunk in self.model:
            chunk.train()
        return sum(losses) / len(losses)

    def save(self) -> Path:
        """Checkpoint the current state into ``--save`` (collective)."""
        checkpoint = self.job.checkpoint
        return save_checkpoint(
            checkpoint.save, self.iteration, self.model, self.optimizer, self.scheduler,
            consumed_samples=self.consumed_samples, signature=self.signature,
            keep_last=checkpoint.keep_last, job=self.job)

    def fit(self) -> dict:
        """Run the job; returns the summary (also written to ``--save``/summary.json). The
        ``--save`` lock is released at the end, also on failure."""
        try:
            messages = self.messages + self.resume()
            self.build_datasets()
            return self._loop(messages)
        finally:
            self.release()

    def _loop(self, messages: list[str]) -> dict:
        job = self.job
        training, checkpoint, logging = job.training, job.checkpoint, job.logging
        self.logger = logger = MetricsLogger(job, self.iteration)
        for line in messages:
            logger.message(line)
        start, last_save, valid_loss, loss = self.iteration, None, None, None
        while self.iteration < training.train_iters:
            if self.uncalibrated and self.iteration >= job.losses.moe_loss_calibration_iters:
                coefficients = self.calibrate()
                logger.message(f"calibrated coefficients at iteration {self.iteration}: "
                               f"{coefficients}")
                logger.write("calibration", self.iteration, coefficients)
            output, scalars = self.train_step()
            loss = output.lm_loss
            if self.iteration % logging.log_interval == 0:
                logger.write("train", self.iteration, scalars)
                if logging.log_per_layer_moe_metrics:
                    logger.write("moe", self.iteration, per_layer_scalars(output))
            logger.step(self.iteration, scalars)
            if self.valid_ds is not None and training.eval_iters > 0 and (
                self.iteration % training.eval_interval == 0
                or self.iteration == training.train_iters
            ):
                valid_loss = self.evaluate()
                logger.write("valid", self.iteration, {"lm_loss": valid_loss})
                logger.message(f"iteration {self.iteration}: valid loss {valid_loss:.4f}")
            stop = any_rank(self.exit_signal.received is not None, self.device) or (
                training.exit_interval is not None and self.iteration >= training.exit_interval
            )
            periodic = checkpoint.save_interval and self.iteration % checkpoint.save_interval == 0
            if checkpoint.save and (periodic or stop or self.iteration == training.train_iters):
                last_save = self.save()
                logger.message(f"saved checkpoint {last_save}")
            if stop:
                logger.message(f"stopping after iteration {self.iteration} (exit signal or "
                               "--exit-interval)")
                break
        exported = None
        if checkpoint.hf_export and self.iteration >= training.train_iters:
            exported = self.export_hf()
            logger.message(f"exported the model as a Hugging Face checkpoint to {exported}")
        logger.close()
        summary = self._summary(start, loss, valid_loss, last_save)
        return {**summary, "hf_export": str(exported)} if exported else summary

    def export_hf(self) -> Path:
        """Write the model as a Hugging Face checkpoint to ``--hf-export`` (collective)."""
        from megatron_patch.hf import export_hf_weights, read_checkpoint

        checkpoint = self.job.checkpoint
        return export_hf_weights(unwrap(self.model[0]), read_checkpoint(checkpoint.hf_load),
                                 checkpoint.hf_export)

    def _summary(self, start: int, loss: Optional[float], valid_loss: Optional[float],
                 last_save: Optional[Path]) -> dict:
        """The run's summary. A run that trained writes it to ``--save``/summary.json; one that
        found the checkpoint already at --train-iters returns the saved one (kept as it is)."""
        save, tensorboard = self.job.checkpoint.save, self.job.logging.tensorboard_dir
        path = Path(save) / "summary.json" if save else None
        if self.iteration == start and path is not None and path.is_file():
            return {**json.loads(path.read_text()), "nothing_to_train": True}
        summary = {
            "iterations": self.iteration,
            "train_loss": loss,
            "valid_loss": valid_loss,
            "checkpoint": str(last_save) if last_save else None,
            "tensorboard_dir": tensorboard,
        }
        if path is not None and dist.get_rank() == 0:
            path.write_text(json.dumps(summary, indent=2))
        return summary
