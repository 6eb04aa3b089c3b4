"""The paper's post-training protocol (arXiv 2505.22323), in miniature, on 2 CPU cores.

1. Data: the downstream task suite (``data.tasks``: five families, train / valid / test), a
   byte-level BPE tokenizer with the ChatML template trained on the built-in corpus and the
   task texts, the corpus tokenized for pretraining, the tasks as instruction data
   (``data.instructions``), and the test conversations as text labelled by task for the
   specialization analysis (NMI(task; expert)).
2. A base model pretrained here with the aux loss only (the ablation's model,
   ``examples/pretrain/configs/ablation_cpu.yaml``: 16 experts top-4, EP=2), exported as a
   Hugging Face (Mixtral) checkpoint with its logits checked against transformers', evaluated
   and analyzed.
3. Post-training of that export (``--hf-load``, so the import path is exercised) on the task
   mixture, per seed, in two modes (full fine-tuning; LoRA rank 8, alpha 32, dropout 0.1 on
   q/k/v/o and the experts, as the paper) and four variants (``VARIANTS``): each exported
   (``--hf-export``), evaluated on the test split (``megatron_patch.evaluation``) and analyzed
   (``tools/analyze_specialization.py`` on the task-labelled test conversations).
4. The report (``posttraining_report``): per task and variant accuracy, answer and validation
   loss, expert overlap, routing variance, silhouette, NMI(task; expert), MaxVio, mean ± std
   over seeds and differences paired by seed against the aux-loss baseline.

Every step is skipped when its output exists (``done`` markers), so an interrupted study
resumes; every command is recorded next to its output.

    python -m megatron_patch.analysis.posttraining [--quick] [--runs-dir D] [--output-dir D]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
DONE = "done"
TIMING = "timing.json"  # a step's own seconds, next to its done marker
ABLATION_PRESET = REPO / "examples" / "pretrain" / "configs" / "ablation_cpu.yaml"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One post-training objective: its label and trainer flags."""

    label: str
    flags: tuple[str, ...]


VARIANTS = {
    "a": Variant("aux loss only", ("--moe-ortho-loss-coeff", "0", "--moe-var-loss-coeff", "0")),
    "b": Variant("+ L_o + L_v, step-0 auto (the paper's calibration)",
                 ("--moe-ortho-loss-coeff", "auto", "--moe-var-loss-coeff", "auto")),
    "c": Variant("+ L_o + L_v, fixed beta 0.01, gamma 0.1 (pretraining sweep and pilot)",
                 ("--moe-ortho-loss-coeff", "0.01", "--moe-var-loss-coeff", "0.1")),
    "d": Variant("+ scale-free L_o + L_v, step-0 auto",
                 ("--moe-ortho-loss-coeff", "auto", "--moe-var-loss-coeff", "auto",
                  "--moe-ortho-loss-normalize")),
}
MODES = {
    "full": ("full fine-tuning", ()),
    "lora": ("LoRA r8 a32 d0.1 (q/k/v/o, experts)",
             ("--lora-rank", "8", "--lora-alpha", "32", "--lora-dropout", "0.1")),
}
BASELINE = "a"


@dataclasses.dataclass(frozen=True)
class StudySetting:
    """Sizes of one study (the quick one's corpus needs no download: the interpreter's own
    code and docs). base_flags / posttrain_flags: trainer flags on top of the ablation
    preset (base) and of the post-training defaults; lr: per mode."""

    name: str
    seeds: tuple[int, ...]
    corpus_domains: Optional[tuple[str, ...]]  # of the built-in corpus; None: all six
    corpus_mb: float
    corpus_valid_fraction: float
    vocab_size: int
    train_per_task: int
    eval_per_task: int
    base_flags: tuple[str, ...]
    posttrain_flags: tuple[str, ...]
    lr: dict
    analysis_flags: tuple[str, ...]


# The default post-training: 690 steps of 32 conversations = 3 epochs of the 7358 training
# conversations (the paper trains 3 epochs). Learning rates from a one-seed pilot of (a): full
# 1e-3 reached train loss 1.1; LoRA 3e-3 reached 3.0 where 1e-2 stayed at 3.9.
SETTINGS = {
    "default": StudySetting(
        name="default", seeds=(1, 2, 3), corpus_domains=None, corpus_mb=1.0,
        corpus_valid_fraction=0.05, vocab_size=4096,
        train_per_task=1600, eval_per_task=100,
        base_flags=("--train-iters", "600", "--eval-interval", "200", "--lr-warmup-iters", "30"),
        posttrain_flags=("--seq-length", "64", "--micro-batch-size", "8",
                         "--global-batch-size", "32", "--train-iters", "690",
                         "--lr-warmup-iters", "20", "--eval-interval", "345",
                         "--eval-iters", "14"),
        lr={"full": 1e-3, "lora": 3e-3},
        analysis_flags=("--num-samples", "128", "--sample-tokens", "2048",
                        "--silhouette-points", "2000")),
    "quick": StudySetting(
        name="quick", seeds=(1,), corpus_domains=("python_code", "python_docs"), corpus_mb=0.1,
        corpus_valid_fraction=0.2, vocab_size=1024, train_per_task=64, eval_per_task=8,
        base_flags=("--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
                    "--moe-ffn-hidden-size", "32", "--num-experts", "8", "--seq-length", "64",
                    "--train-iters", "6", "--eval-interval", "6", "--eval-iters", "1",
                    "--lr-warmup-iters", "1"),
        posttrain_flags=("--seq-length", "64", "--micro-batch-size", "4",
                         "--global-batch-size", "8", "--train-iters", "4",
                         "--lr-warmup-iters", "1", "--eval-interval", "4", "--eval-iters", "1"),
        lr={"full": 1e-3, "lora": 3e-3},
        analysis_flags=("--num-samples", "8", "--sample-tokens", "128",
                        "--silhouette-points", "100")),
}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _shown(arg: object) -> str:
    """A command word as the record shows it: paths relative to the repository (commands run
    from there), the interpreter as ``python``."""
    text = str(arg)
    if text == sys.executable:
        return "python"
    return text[len(str(REPO)) + 1:] if text.startswith(f"{REPO}/") else text


def run_logged(command: Sequence[str], directory: Path, name: str) -> None:
    """Run ``command`` from the repository, its output in ``directory/<name>.log`` and the
    command line in ``directory/<name>.command.txt``.

    Raises:
        RuntimeError: a non-zero exit, with the log's tail.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.command.txt").write_text(shlex.join(map(_shown, command)) + "\n")
    with (directory / f"{name}.log").open("w") as log:
        status = subprocess.run(list(map(str, command)), cwd=REPO, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT).returncode
    if status != 0:
        tail = (directory / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(f"{name} failed (exit {status}; {directory / name}.log):\n{tail}")


def _trainer(nproc: int) -> list[str]:
    return [sys.executable, "-m", "megatron_patch.launch", "--nproc-per-node", str(nproc),
            "-m", "megatron_patch.training.pretrain"]


def _tool(name: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / name)]


class Study:
    """The study's directories and steps (module docstring); ``run`` does what is not done."""

    def __init__(self, setting: StudySetting, runs_dir: Path, output_dir: Path,
                 variants: Sequence[str], modes: Sequence[str], nproc: int = 2) -> None:
        self.setting, self.runs, self.output = setting, runs_dir, output_dir
        self.variants, self.modes, self.nproc = list(variants), list(modes), nproc
        self.suite, self.tokenizer = runs_dir / "suite", runs_dir / "tokenizer"
        self.data, self.base = runs_dir / "data", runs_dir / "base"

    def run_dir(self, variant: str, mode: str, seed: int) -> Path:
        return self.runs / "posttrain" / f"{variant}_{mode}_seed{seed}"

    # --- 1. data ---------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if (self.data / DONE).is_file():
            return
        start = time.time()
        from megatron_patch.data.corpus import DEFAULT_CACHE_DIR, DOMAIN_NAMES, build_corpus
        from megatron_patch.data.instructions import preprocess_instructions
        from megatron_patch.data.preprocess import preprocess_jsonl
        from megatron_patch.data.tasks import write_task_suite
        from megatron_patch.hf.tiny import save_tiny_tokenizer

        setting = self.setting
        write_task_suite(self.suite, train_per_task=setting.train_per_task,
                         eval_per_task=setting.eval_per_task)
        self.data.mkdir(parents=True, exist_ok=True)
        corpus = self.data / "corpus.jsonl"
        build_corpus(corpus, DEFAULT_CACHE_DIR, setting.corpus_domains or DOMAIN_NAMES,
                     max_mb_per_domain=setting.corpus_mb,
                     valid_fraction=setting.corpus_valid_fraction)
        texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
        texts += [f"{row['prompt']}\n{row['response']}"
                  for row in map(json.loads, (self.suite / "train.jsonl").read_text().splitlines())]
        save_tiny_tokenizer(self.tokenizer, texts, vocab_size=setting.vocab_size)
        for split in ("train", "valid"):
            preprocess_jsonl(corpus, str(self.data / f"corpus_{split}"), str(self.tokenizer),
                             only_split=split)
            preprocess_instructions(self.suite / f"{split}.jsonl", str(self.data / f"sft_{split}"),
                                    str(self.tokenizer), self.posttrain_seq_length())
        self._write_analysis_text()
        (self.data / TIMING).write_text(json.dumps({"data_s": time.time() - start}))
        (self.data / DONE).write_text("")

    def posttrain_seq_length(self) -> int:
        flags = list(self.setting.posttrain_flags)
        return int(flags[flags.index("--seq-length") + 1])

    def _write_analysis_text(self) -> None:
        """The test items as the conversations post-training sees (chat template, reference
        answer), one document each, labelled by task: the specialization analysis's data."""
        from transformers import AutoTokenizer

        from megatron_patch.data.preprocess import preprocess_jsonl

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer)
        path = self.data / "analysis.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for row in map(json.loads, (self.suite / "test.jsonl").read_text().splitlines()):
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": row["prompt"]},
                     {"role": "assistant", "content": row["answer"]}], tokenize=False)
                out.write(json.dumps({"text": text, "domain": row["task"]},
                                     ensure_ascii=False) + "\n")
        preprocess_jsonl(path, str(self.data / "analysis"), str(self.tokenizer))

    # --- 2. base model ---------------------------------------------------------------------

    def pretrain_base(self) -> None:
        if (self.base / DONE).is_file():
            return
        start = time.time()
        run_logged([*_trainer(self.nproc), "--config", ABLATION_PRESET,
                    "--data-path", self.data / "corpus_train",
                    "--valid-data-path", self.data / "corpus_valid",
                    "--tokenizer-model", self.tokenizer, "--save", self.base / "checkpoints",
                    "--seed", "1234", "--no-progress-bar", *self.setting.base_flags],
                   self.base, "train")
        trained = time.time()
        run_logged([*_tool("export_hf.py"), "--load", self.base / "checkpoints", "--hf-export",
                    self.base / "hf", "--check"], self.base, "export")
        self.evaluate(self.base / "hf", self.base / "eval")
        self.analyze(self.base / "checkpoints", self.base)
        self._timing(self.base, start, trained)
        (self.base / DONE).write_text("")

    # --- 3. post-training ------------------------------------------------------------------

    def posttrain(self, variant: str, mode: str, seed: int) -> None:
        run = self.run_dir(variant, mode, seed)
        if (run / DONE).is_file():
            return
        start = time.time()
        lr = self.setting.lr[mode]
        run_logged([*_trainer(self.nproc), "--hf-load", self.base / "hf",
                    "--data-path", self.data / "sft_train",
                    "--valid-data-path", self.data / "sft_valid",
                    "--expert-model-parallel-size", str(self.nproc),
                    "--lr", str(lr), "--min-lr", str(lr / 10), "--seed", str(seed),
                    "--save", run / "checkpoints", "--hf-export", run / "hf",
                    "--no-progress-bar", *self.setting.posttrain_flags,
                    *VARIANTS[variant].flags, *MODES[mode][1]], run, "train")
        trained = time.time()
        self.evaluate(run / "hf", run / "eval")
        self.analyze(run / "checkpoints", run)
        self._timing(run, start, trained)
        (run / DONE).write_text("")

    def evaluate(self, model_dir: Path, out: Path) -> None:
        """The test split, in this process (greedy answers up to 16 tokens)."""
        from megatron_patch.evaluation import evaluate, load_items, summary, write_report
        from megatron_patch.evaluation.models import HFModel

        items = load_items(self.suite / "test.jsonl")
        results = evaluate(HFModel(str(model_dir)), items, batch_size=32, max_new_tokens=16,
                           progress=False)
        write_report(summary(results, str(model_dir)), out)

    def analyze(self, checkpoints: Path, run: Path) -> None:
        run_logged([*_tool("analyze_specialization.py"), "--load", checkpoints,
                    "--data-path", self.data / "analysis", "--output-dir", run / "analysis",
                    "--no-progress-bar", "--no-plots", *self.setting.analysis_flags],
                   run, "analysis")

    @staticmethod
    def _timing(run: Path, start: float, trained: float) -> None:
        (run / TIMING).write_text(json.dumps(
            {"train_s": trained - start, "evaluation_and_analysis_s": time.time() - trained}))

    # --- all of it -------------------------------------------------------------------------

    def run(self, report_only: bool = False) -> Path:
        """Every step not done yet, then the report; returns the report's Markdown path."""
        from megatron_patch.analysis.posttraining_report import write_study_report

        if not report_only:
            start = time.time()
            self.prepare_data()
            print(f"data ready ({time.time() - start:.0f} s)", flush=True)
            self.pretrain_base()
            print(f"base model ready ({time.time() - start:.0f} s)", flush=True)
            for seed in self.setting.seeds:
                for mode in self.modes:
                    for variant in self.variants:
                        self.posttrain(variant, mode, seed)
                        print(f"[{variant} {mode} seed {seed}] done "
                              f"({time.time() - start:.0f} s)", flush=True)
                write_study_report(self)  # refreshed after every seed
        return write_study_report(self)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttraining_study", description=__doc__.split(
        "\n\n")[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model, a few steps, one seed: minutes, a check that the "
                             "pipeline runs, not evidence")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: full, lora")
    parser.add_argument("--seeds", default=None, help="comma-separated (default: the setting's)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="default runs/posttraining_<setting>")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="default docs/results/posttraining (quick: "
                             "docs/results/posttraining_quick)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (EP size)")
    parser.add_argument("--report-only", action="store_true",
                        help="only (re)write the report from the runs directory")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setting = SETTINGS["quick" if args.quick else "default"]
    if args.seeds:
        setting = dataclasses.replace(setting, seeds=tuple(int(s) for s in args.seeds.split(",")))
    variants, modes = args.variants.split(","), args.modes.split(",")
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(modes) - set(MODES))
    if unknown or BASELINE not in variants:
        print(f"error: unknown variants/modes {unknown} (variants: {', '.join(VARIANTS)}; "
              f"modes: {', '.join(MODES)}); the baseline {BASELINE!r} must be among the "
              "variants", file=sys.stderr)
        return 2
    suffix = "" if setting.name == "default" else f"_{setting.name}"
    runs = args.runs_dir or REPO / "runs" / f"posttraining_{setting.name}"
    output = args.output_dir or REPO / "docs" / "results" / f"posttraining{suffix}"
    study = Study(setting, runs, output, variants, modes, args.nproc)
    try:
        report = study.run(args.report_only)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
