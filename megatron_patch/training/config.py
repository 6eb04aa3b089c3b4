"""The training job's typed configuration: sections, built once from flags + YAML, validated in one
place, stored in every checkpoint.

    JobConfig
      model                  ModelConfig                 transformer shape, dtype
      moe                    MoEConfig                   experts, router, dispatcher
      losses                 LossConfig                  L_o, L_v, calibration (moe/loss_config.py)
      orthogonal_optimizer   OrthogonalOptimizerConfig   OMoE (optimizer/orthogonal.py)
      parallel               ParallelConfig              TP/PP/EP/ETP/SP, backend
      optimizer              OptimizerConfig             AdamW, LR schedule, clipping
      training               TrainingConfig              batch sizes, iterations, recompute, eval
      data                   DataConfig                  datasets, tokenizer
      checkpoint             CheckpointConfig            save/load, fine-tuning, Hugging Face
      lora                   LoRAConfig                  LoRA post-training (training/lora.py)
      logging                LoggingConfig               console, TensorBoard, wandb

Every field is one Megatron-style flag (``megatron_patch.flags``). Checks: each section checks its
own fields when built; ``JobConfig`` checks what spans sections when built; ``validate`` adds
what needs the world size and the environment (the parallel layout, the batch split, the data
and tokenizer flags, the fused kernel, megatron-core's own config checks) before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_patch.distributed.layout import Layout
from megatron_patch.distributed.world import BACKENDS
from megatron_patch.flags import ConfigError, dest, flag_fields, from_namespace, option
from megatron_patch.moe.loss_config import LossConfig
from megatron_patch.optimizer.orthogonal import OrthogonalOptimizerConfig
from megatron_patch.training.lora import LoRAConfig


def _at_least(minimum: int, **values: int) -> None:
    for name, value in values.items():
        if value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


@dataclass
class ModelConfig:
    """The transformer: sizes, positions, normalization, dtype."""

    num_layers: int = option(2, "transformer layers")
    hidden_size: int = option(128, "model width")
    ffn_hidden_size: Optional[int] = option(None, "dense MLP size (default 4 * hidden size)")
    num_attention_heads: int = option(4, "attention heads")
    num_query_groups: Optional[int] = option(None, "grouped-query attention groups")
    seq_length: int = option(128, "tokens per sample")
    max_position_embeddings: Optional[int] = option(None, "default: --seq-length")
    position_embedding_type: str = option("rope", "", choices=("learned_absolute", "rope"))
    normalization: str = option("RMSNorm", "", choices=("LayerNorm", "RMSNorm"))
    swiglu: bool = option(False, "gated SiLU expert/dense MLPs")
    untie_embeddings_and_output_weights: bool = option(False, "separate output layer weights")
    init_method_std: float = option(0.02, "standard deviation of the weight initialization")
    hidden_dropout: float = option(0.0, "dropout after attention and MLP")
    attention_dropout: float = option(0.0, "dropout of the attention probabilities")
    bf16: bool = option(False, "bf16 training (GPU)")

    def __post_init__(self) -> None:
        _at_least(1, num_layers=self.num_layers, hidden_size=self.hidden_size,
                  num_attention_heads=self.num_attention_heads, seq_length=self.seq_length)
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError("--hidden-size must be divisible by --num-attention-heads")


@dataclass
class MoEConfig:
    """Routed experts, router and token dispatcher (megatron-core's MoE flags)."""

    num_experts: int = option(8, "routed experts per MoE layer")
    moe_router_topk: int = option(2, "experts per token")
    moe_ffn_hidden_size: Optional[int] = option(None, "expert MLP size (default: --ffn-hidden-size)")
    moe_shared_expert_intermediate_size: Optional[int] = option(
        None, "total size of the shared experts (DeepSeek-style); none by default")
    moe_layer_freq: int = option(1, "every N-th layer is MoE (1: all layers)")
    moe_router_load_balancing_type: str = option(
        "aux_loss", "megatron-core's load-balancing loss",
        choices=("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"))
    moe_aux_loss_coeff: float = option(1e-2, "alpha of the load-balancing loss")
    moe_z_loss_coeff: Optional[float] = option(None, "router z-loss coefficient")
    moe_router_score_function: str = option("softmax", "", choices=("softmax", "sigmoid"))
    moe_router_pre_softmax: bool = option(False, "softmax before top-k (no renormalization)")
    moe_router_enable_expert_bias: bool = option(False, "aux-loss-free expert bias (DeepSeek-V3)")
    moe_token_dispatcher_type: str = option("alltoall", "", choices=("alltoall", "allgather", "flex"))
    moe_expert_capacity_factor: Optional[float] = option(
        None, "expert capacity = factor x tokens x topk / experts (tokens beyond it are dropped)")
    moe_pad_expert_input_to_capacity: bool = option(False, "pad every expert to its capacity")
    moe_grouped_gemm: bool = option(False, "grouped GEMM experts (GPU)")
    moe_identical_expert_init: bool = option(
        False, "start every routed expert of a layer as a copy of its expert 0 (the state sparse "
        "upcycling starts from; a test of expert diversification)")
    moe_permute_fusion: bool = option(False, "fused token permutation (GPU)")

    def __post_init__(self) -> None:
        _at_least(1, num_experts=self.num_experts, moe_router_topk=self.moe_router_topk,
                  moe_layer_freq=self.moe_layer_freq)
        if self.moe_router_topk > self.num_experts:
            raise ConfigError("--moe-router-topk cannot exceed --num-experts")
        for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be >= 0 (0 disables the loss), got {value}"
                )
        if self.moe_identical_expert_init and self.moe_grouped_gemm:
            raise ConfigError(
                "--moe-identical-expert-init supports SequentialMLP experts: drop --moe-grouped-gemm"
            )


@dataclass
class ParallelConfig:
    """Model-parallel sizes; the data-parallel size is what the world size leaves."""

    tensor_model_parallel_size: int = option(1, "TP")
    pipeline_model_parallel_size: int = option(1, "PP")
    expert_model_parallel_size: int = option(1, "EP")
    expert_tensor_parallel_size: Optional[int] = option(
        None, "ETP (default: --tensor-model-parallel-size)")
    sequence_parallel: bool = option(False, "SP (required with TP > 1)")
    use_distributed_optimizer: bool = option(False, "Megatron's distributed optimizer (GPU)")
    distributed_backend: str = option("auto", "auto: nccl with GPUs, gloo without",
                                      choices=BACKENDS)

    def __post_init__(self) -> None:
        if self.expert_tensor_parallel_size is None:
            self.expert_tensor_parallel_size = self.tensor_model_parallel_size
        _at_least(1, tensor_model_parallel_size=self.tensor_model_parallel_size,
                  pipeline_model_parallel_size=self.pipeline_model_parallel_size,
                  expert_model_parallel_size=self.expert_model_parallel_size,
                  expert_tensor_parallel_size=self.expert_tensor_parallel_size)

    def layout(self, world_size: int) -> Layout:
        """The layout of ``world_size`` processes (``Layout``'s rule; ConfigError if invalid)."""
        try:
            return Layout.for_world(
                world_size, tp=self.tensor_model_parallel_size,
                pp=self.pipeline_model_parallel_size, ep=self.expert_model_parallel_size,
                etp=self.expert_tensor_parallel_size, sp=self.sequence_parallel)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @classmethod
    def of(cls, layout: Layout, **kwargs: Any) -> "ParallelConfig":
        """The section that runs ``layout`` (its dp is the world's)."""
        return cls(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
                   expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
                   sequence_parallel=layout.sp, **kwargs)


@dataclass
class OptimizerConfig:
    """AdamW, warmup + decay schedule, gradient clipping."""

    lr: float = option(1e-3, "peak learning rate")
    min_lr: float = option(1e-4, "final learning rate")
    lr_warmup_iters: int = option(10, "linear warmup steps")
    lr_decay_style: str = option("cosine", "", choices=("cosine", "linear", "constant"))
    weight_decay: float = option(0.1, "")
    adam_beta1: float = option(0.9, "")
    adam_beta2: float = option(0.95, "")
    adam_eps: float = option(1e-8, "")
    clip_grad: float = option(1.0, "global gradient-norm clip (0: off)")

    def __post_init__(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} must be <= --lr {self.lr}")
        _at_least(0, lr_warmup_iters=self.lr_warmup_iters)


@dataclass
class TrainingConfig:
    """Batch sizes, iterations, seed, activation recomputation, evaluation schedule."""

    micro_batch_size: int = option(4, "samples per micro-batch and data-parallel rank")
    global_batch_size: int = option(16, "samples per step, over all data-parallel ranks")
    train_iters: int = option(100, "steps")
    seed: int = option(1234, "")
    recompute_granularity: Optional[str] = option(None, "", choices=("full", "selective"))
    recompute_method: Optional[str] = option(None, "", choices=("uniform", "block"))
    recompute_num_layers: Optional[int] = option(None, "")
    recompute_modules: Optional[list[str]] = option(
        None, "with --recompute-granularity selective: the modules recomputed (megatron-core's "
        "names, e.g. core_attn moe; default core_attn)")
    eval_interval: int = option(50, "validate every N steps (and at the end)")
    eval_iters: int = option(5, "validation global batches")
    exit_interval: Optional[int] = option(
        None, "save (with --save) and exit after this iteration")

    def __post_init__(self) -> None:
        _at_least(1, micro_batch_size=self.micro_batch_size,
                  global_batch_size=self.global_batch_size, train_iters=self.train_iters,
                  eval_interval=self.eval_interval)
        _at_least(0, eval_iters=self.eval_iters)


@dataclass
class DataConfig:
    """Datasets (megatron indexed .bin/.idx) and the tokenizer they were made with."""

    data_path: Optional[list[str]] = option(
        None, "dataset prefixes, optionally weighted: 'P' or 'W1 P1 W2 P2 ...'")
    split: str = option("98,2,0", "train,valid,test document proportions of --data-path")
    valid_data_path: Optional[list[str]] = option(
        None, "separate validation prefixes (then --data-path is all training data)")
    tokenizer_model: Optional[str] = option(
        None, "sentencepiece .model file or Hugging Face tokenizer directory (default with "
        "--hf-load: the checkpoint's)")
    data_cache_path: Optional[str] = option(None, "where dataset indices are cached")


@dataclass
class CheckpointConfig:
    """Where checkpoints go and come from."""

    save: Optional[str] = option(None, "checkpoint directory")
    load: Optional[str] = option(None, "checkpoint directory to resume from")
    finetune: bool = option(
        False, "with --load: take the checkpoint's model weights only and start at iteration 0 "
        "with a fresh optimizer, LR schedule and data position (post-training); 'auto' loss "
        "coefficients are calibrated anew")
    save_interval: Optional[int] = option(None, "save every N steps")
    keep_last: int = option(3, "checkpoints kept on disk")
    no_checkpoint_fallback: bool = option(
        False, "stop when the newest checkpoint of --load is damaged, instead of loading the "
        "newest intact one (with a warning)")
    hf_load: Optional[str] = option(
        None, "post-train a Hugging Face MoE checkpoint (directory): its weights, architecture, "
        "router settings and tokenizer; iteration 0, fresh optimizer (needs the [hf] extra)")
    hf_export: Optional[str] = option(
        None, "with --hf-load: write the trained model as a Hugging Face checkpoint to this new "
        "directory at the end (tools/export_hf.py does it from any saved checkpoint)")

    def __post_init__(self) -> None:
        if self.finetune and self.load is None:
            raise ConfigError("--finetune needs --load: the checkpoint whose weights to start from")
        if self.hf_load and self.load:
            raise ConfigError(
                "--hf-load and --load both name the weights to start from: give --hf-load to "
                "post-train a Hugging Face checkpoint (an interrupted run resumes from --save), "
                "or --load to resume/fine-tune a checkpoint of this project")
        if self.hf_export and not self.hf_load:
            raise ConfigError("--hf-export needs --hf-load: the exported checkpoint takes the "
                              "architecture, config and tokenizer of the imported one")
        if self.load is None and self.save is None and self.save_interval:
            raise ConfigError("--save-interval needs --save DIR")


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl (in --save), TensorBoard and wandb."""

    log_interval: int = option(1, "log every N steps")
    tensorboard_dir: Optional[str] = option(None, "TensorBoard event files")
    wandb_project: Optional[str] = option(None, "wandb project (offline without WANDB_API_KEY)")
    wandb_exp_name: Optional[str] = option(None, "")
    wandb_save_dir: Optional[str] = option(None, "")
    log_per_layer_moe_metrics: bool = option(False, "per-layer MoE losses, load and MaxVio")
    no_progress_bar: bool = option(False, "one line per logged step instead of a progress bar")

    def __post_init__(self) -> None:
        _at_least(1, log_interval=self.log_interval)


# (attribute, section class, flag-group title), in --help order.
SECTIONS: tuple[tuple[str, type, str], ...] = (
    ("model", ModelConfig, "model"),
    ("moe", MoEConfig, "mixture of experts"),
    ("losses", LossConfig, "expert specialization losses (arXiv 2505.22323)"),
    ("orthogonal_optimizer", OrthogonalOptimizerConfig,
     "orthogonal expert optimizer (OMoE, arXiv 2310.09762)"),
    ("parallel", ParallelConfig, "parallelism"),
    ("optimizer", OptimizerConfig, "optimizer"),
    ("training", TrainingConfig, "training"),
    ("data", DataConfig, "data"),
    ("checkpoint", CheckpointConfig, "checkpointing"),
    ("lora", LoRAConfig, "LoRA post-training"),
    ("logging", LoggingConfig, "logging"),
)


@dataclass
class JobConfig:
    """Every setting of a training job, by section (see the module docstring)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    orthogonal_optimizer: OrthogonalOptimizerConfig = field(
        default_factory=OrthogonalOptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        model, moe, parallel, training = self.model, self.moe, self.parallel, self.training
        if moe.moe_ffn_hidden_size is None:
            moe.moe_ffn_hidden_size = model.ffn_hidden_size
        tp, pp, ep = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                      parallel.expert_model_parallel_size)
        if moe.num_experts % ep != 0:
            raise ConfigError(
                f"--num-experts {moe.num_experts} is not divisible by "
                f"--expert-model-parallel-size {ep}; each EP rank must hold the same number of "
                "experts"
            )
        if model.num_layers % pp != 0:
            raise ConfigError(f"--num-layers {model.num_layers} is not divisible by "
                              f"--pipeline-model-parallel-size {pp}")
        if parallel.sequence_parallel and model.seq_length % tp != 0:
            raise ConfigError(f"--seq-length {model.seq_length} must be divisible by "
                              f"--tensor-model-parallel-size {tp} with --sequence-parallel")
        if model.num_attention_heads % tp != 0:
            raise ConfigError(
                "--num-attention-heads must be divisible by --tensor-model-parallel-size")
        if self.lora.enabled and self.checkpoint.load:
            raise ConfigError(
                "--lora-rank with --load: adapters start with --hf-load (an interrupted LoRA run "
                "resumes from its --save); fine-tuning a checkpoint of this project with LoRA is "
                "not supported")
        if (self.lora.enabled and "experts" in self.lora.lora_targets
                and parallel.expert_tensor_parallel_size > 1):
            raise ConfigError(
                "--lora-targets experts needs --expert-tensor-parallel-size 1 (adapters on "
                "expert-tensor-parallel shards are not supported): set it (with "
                "--expert-model-parallel-size > 1 under tensor parallelism), or drop experts "
                "from --lora-targets")
        if self.lora.enabled and self.orthogonal_optimizer.enabled:
            raise ConfigError("the orthogonal expert optimizer projects full expert-weight "
                              "updates; with --lora-rank the experts are frozen: drop one")
        if self.checkpoint.hf_load and moe.moe_identical_expert_init:
            raise ConfigError("--moe-identical-expert-init initializes experts; with --hf-load "
                              "they come from the checkpoint: drop it")
        calibration_iters = self.losses.moe_loss_calibration_iters
        if calibration_iters and not calibration_iters < training.train_iters:
            raise ConfigError(
                f"--moe-loss-calibration-iters {calibration_iters} must be in "
                f"[1, --train-iters {training.train_iters}); pass 0 to calibrate on the first "
                "batch")
        if not self.optimizer.lr_warmup_iters < training.train_iters:
            raise ConfigError(
                f"--lr-warmup-iters {self.optimizer.lr_warmup_iters} must be smaller than "
                f"--train-iters {training.train_iters}")

    def layout(self, world_size: int) -> Layout:
        """The parallel layout on ``world_size`` processes, with the batch split checked."""
        layout = self.parallel.layout(world_size)
        training = self.training
        if training.global_batch_size % (training.micro_batch_size * layout.dp) != 0:
            raise ConfigError(
                f"--global-batch-size {training.global_batch_size} must be a multiple of "
                f"--micro-batch-size {training.micro_batch_size} x data-parallel size {layout.dp}")
        return layout

    def num_microbatches(self, layout: Layout) -> int:
        """Micro-batches per data-parallel rank and step."""
        return self.training.global_batch_size // (self.training.micro_batch_size * layout.dp)

    def validate(self, world_size: int) -> Layout:
        """Everything checkable before any process group exists; returns the layout.

        Raises:
            ConfigError: with the offending flags and a fix.
        """
        layout = self.layout(world_size)
        if self.data.data_path is None:
            raise ConfigError(
                "--data-path is required (dataset prefix of a .bin/.idx pair); `make data` builds "
                "the built-in corpus into data/corpus_train, tools/preprocess_data.py converts "
                "your jsonl")
        if self.data.tokenizer_model is None:
            raise ConfigError("--tokenizer-model is required: the tokenizer the data was "
                              "tokenized with (data/tokenizer.model for the built-in corpus)")
        export = self.checkpoint.hf_export
        if export and Path(export).exists() and (
                not Path(export).is_dir() or any(Path(export).iterdir())):
            raise ConfigError(f"--hf-export {export} exists and is not an empty directory; "
                              "export into a new directory (nothing there is overwritten)")
        self.check_model()
        return layout

    def check_model(self) -> None:
        """The model's own checks (megatron-core's and the losses'), and whether the fused
        kernel can run here; before any process group exists.

        Raises:
            ConfigError (or megatron-core's ValueError/AssertionError): naming the setting.
        """
        from megatron_patch.moe.gated_gram import triton_kernel_problem
        from megatron_patch.training.model import job_transformer_config

        if self.losses.moe_ortho_loss_kernel == "triton" and (problem := triton_kernel_problem()):
            raise ConfigError(problem)
        job_transformer_config(self)

    # --- flat form: flag destination -> value -------------------------------------------------

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "JobConfig":
        """From a mapping of flag destinations (parsed flags, or the flags an older checkpoint
        recorded); absent keys take their defaults, unknown keys are ignored."""
        return cls(**{name: from_namespace(section, values) for name, section, _ in SECTIONS})

    def flat(self) -> dict[str, Any]:
        """flag destination -> value, over all sections."""
        return {dest(f): getattr(getattr(self, name), f.name)
                for name, section, _ in SECTIONS for f in flag_fields(section)}

    # --- nested form: what checkpoints store --------------------------------------------------

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, stored: dict[str, dict[str, Any]]) -> "JobConfig":
        """From ``to_dict``'s form; settings added since take their defaults."""
        sections = {}
        for name, section, _ in SECTIONS:
            known = {f.name for f in dataclasses.fields(section)}
            sections[name] = section(**{k: v for k, v in stored.get(name, {}).items()
                                        if k in known})
        return cls(**sections)

    def replace(self, **sections: dict[str, Any]) -> "JobConfig":
        """A copy with some fields of some sections changed (re-validated):
        ``job.replace(training={"micro_batch_size": 1})``."""
        stored = self.to_dict()
        for name, changes in sections.items():
            stored[name].update(changes)
        return JobConfig.from_dict(stored)
