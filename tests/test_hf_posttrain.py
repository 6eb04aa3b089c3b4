"""Post-training a Hugging Face MoE (``--hf-load`` / ``--hf-export``) end to end: a tiny random
Qwen3-MoE with its own byte-level BPE tokenizer, data tokenized with that tokenizer, the
trainer under the launcher with expert parallelism, L_o + L_v calibrated on the first batch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_patch.hf.check import compare_export
from megatron_patch.hf.tiny import save_tiny_model, save_tiny_tokenizer
from training_helpers import REPO, TINY, clean_env, pretrain

POSTTRAIN = [
    "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--train-iters", "6", "--lr", "1e-3", "--lr-warmup-iters", "1", "--eval-interval", "6",
    "--eval-iters", "1", "--moe-ortho-loss-coeff", "auto", "--moe-var-loss-coeff", "auto",
    "--no-progress-bar",
]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny Qwen3-MoE (4 experts, top-2) whose directory holds its tokenizer, and train/valid
    datasets tokenized with that tokenizer directory."""
    from megatron_patch.data.corpus import build_corpus
    from megatron_patch.data.preprocess import preprocess_jsonl

    root = tmp_path_factory.mktemp("tiny_hf")
    corpus = root / "corpus.jsonl"
    build_corpus(corpus, root / "cache", ("python_code", "python_docs"), max_mb_per_domain=0.1,
                 valid_fraction=0.2, seed=3)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    model = root / "model"
    vocab_size = save_tiny_tokenizer(model, texts, vocab_size=384)
    save_tiny_model("qwen3_moe", model, vocab_size=vocab_size)
    for split in ("train", "valid"):
        preprocess_jsonl(corpus, str(root / split), str(model), workers=1, only_split=split)
    return SimpleNamespace(model=model, train=str(root / "train"), valid=str(root / "valid"))


def _launch(tiny_hf, save, export, *flags):
    command = [sys.executable, "-m", "megatron_patch.launch", "--nproc-per-node", "2",
               "-m", "megatron_patch.training.pretrain", "--hf-load", str(tiny_hf.model),
               "--data-path", tiny_hf.train, "--valid-data-path", tiny_hf.valid,
               "--expert-model-parallel-size", "2", "--save", str(save),
               "--hf-export", str(export), *POSTTRAIN, *flags]
    return subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=600)


def _assert_generates(export) -> None:
    """transformers loads the exported model and its tokenizer and generates new tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    prompt = tokenizer("def add(a, b):", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def _metrics(save):
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def test_posttraining_resumes_and_exports_a_model_transformers_generates_from(tiny_hf, tmp_path):
    save, export = tmp_path / "run", tmp_path / "hf"
    first = _launch(tiny_hf, save, export, "--exit-interval", "3")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert not export.exists()  # stopped before --train-iters: nothing exported yet
    second = _launch(tiny_hf, save, export)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert "--hf-load: --save" in output and "resuming at iteration 3" in output

    rows = _metrics(save)
    calibration = [row for row in rows if row["split"] == "calibration"]
    assert len(calibration) == 1 and calibration[0]["iteration"] == 0  # first batch, once
    assert calibration[0]["ortho_loss"] > 0 and calibration[0]["var_loss"] > 0
    train = [row for row in rows if row["split"] == "train"]
    assert [row["iteration"] for row in train] == [1, 2, 3, 4, 5, 6]
    assert all(row["ortho_loss"] > 0 and row["var_loss"] < 0 for row in train)

    # The export: the source's tensor names, dtypes and shapes with trained values; the same
    # tensors as an export of the saved checkpoint by the tool (one process, resharded).
    difference, missing, extra = compare_export(tiny_hf.model, export)
    assert not missing and not extra and 0 < difference < float("inf")
    tool_export = tmp_path / "hf_from_checkpoint"
    tool = subprocess.run([sys.executable, "tools/export_hf.py", "--load", str(save),
                           "--hf-export", str(tool_export)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert tool.returncode == 0, tool.stderr[-3000:]
    assert compare_export(export, tool_export) == (0.0, [], [])

    _assert_generates(export)


def test_posttraining_bad_input_stops_before_any_work(tiny_hf, tmp_path):
    """Refused while the flags are read and checked (in process: ``parse_args`` and
    ``validate``, what the trainer runs first), or, for the tokenizer, by the trainer under its
    exit status 2."""
    from megatron_patch.flags import ConfigError
    from megatron_patch.training.arguments import parse_args

    data = ["--data-path", tiny_hf.train, "--valid-data-path", tiny_hf.valid]
    with pytest.raises(ConfigError) as contradiction:
        parse_args(["--hf-load", str(tiny_hf.model), *data, "--num-experts", "8",
                    "--moe-router-topk", "2", *POSTTRAIN])
    assert "--num-experts 8 (the checkpoint has 4)" in str(contradiction.value)
    assert "--moe-router-topk" not in str(contradiction.value)  # agrees with the checkpoint

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("earlier export")
    job = parse_args(["--hf-load", str(tiny_hf.model), *data, "--hf-export", str(occupied),
                      *POSTTRAIN])
    with pytest.raises(ConfigError, match="is not an empty directory"):
        job.validate(1)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]

    with pytest.raises(ConfigError, match="--hf-load and --load"):
        parse_args(["--hf-load", str(tiny_hf.model), "--load", str(tmp_path), *data, *POSTTRAIN])

    unsupported = tmp_path / "deepseek_moe"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "deepseek"}))
    with pytest.raises(ConfigError, match="'deepseek' is not supported"):
        parse_args(["--hf-load", str(unsupported), *data, *POSTTRAIN])

    no_tokenizer = tmp_path / "weights_only"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_hf.model / name, no_tokenizer / name)
    missing = pretrain(["--hf-load", str(no_tokenizer), *data, *POSTTRAIN], check=False)
    assert missing.returncode == 2 and "has no tokenizer.json" in missing.stderr


@pytest.mark.slow
def test_posttraining_on_instruction_data(tiny_hf, tmp_path):
    """Chat-rendered prompt/response records, the loss on the responses only (the masks are
    checked in test_instructions.py), one process; the run trains and validates (slow: the
    quick post-training study in make test trains on instruction data end to end too)."""
    from megatron_patch.data.instructions import preprocess_instructions

    source = tmp_path / "sft.jsonl"
    source.write_text("".join(
        json.dumps({"prompt": f"Add {a} and {b}.", "response": f"{a + b}"}) + "\n"
        for a in range(20) for b in range(10)))
    summary = preprocess_instructions(source, str(tmp_path / "sft"), str(tiny_hf.model), 32)
    assert summary.kept == 200 and not summary.bad
    save = tmp_path / "run"
    pretrain(["--hf-load", str(tiny_hf.model), "--data-path", str(tmp_path / "sft"),
              "--split", "90,10,0", "--save", str(save), *POSTTRAIN])
    rows = _metrics(save)
    train = [row for row in rows if row["split"] == "train"]
    valid = [row for row in rows if row["split"] == "valid"]
    assert len(train) == 6 and all(row["lm_loss"] == row["lm_loss"] for row in train)
    assert len(valid) == 1 and valid[0]["iteration"] == 6


def test_lora_posttraining_changes_exactly_the_adapted_weights(tiny_hf, tmp_path):
    """LoRA (the paper's rank 8, alpha 32, dropout 0.1 on q/k/v/o and the experts'
    gate/up/down), EP=2: the export merges the adapters into exactly those weights; the frozen
    router, norms and embeddings come out bit-identical; transformers generates from it."""
    from safetensors import safe_open

    from megatron_patch.hf.architectures import read_checkpoint

    save, export = tmp_path / "run", tmp_path / "hf"
    result = _launch(tiny_hf, save, export, "--lora-rank", "8", "--lora-alpha", "32",
                     "--lora-dropout", "0.1")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    source, exported = read_checkpoint(tiny_hf.model), read_checkpoint(export)
    assert set(source.weight_files) == set(exported.weight_files)
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    changed = set()
    for name in source.weight_files:
        with safe_open(source.weight_files[name], "pt") as a, \
                safe_open(exported.weight_files[name], "pt") as b:
            if not torch.equal(a.get_tensor(name), b.get_tensor(name)):
                changed.add(name)
    expected = {name for name in source.weight_files if name.split(".")[-2] in adapted}
    assert changed == expected
    _assert_generates(export)


def test_model_pretrained_here_exports_as_mixtral_with_its_logits(tiny_hf, tmp_path):
    """A GPT-MoE pretrained by this project's trainer (SwiGLU, RMSNorm, RoPE, tied embeddings,
    an HF tokenizer) exports as a Mixtral whose transformers logits equal the checkpoint's
    (``--check``); transformers generates from it; a model Mixtral cannot express is refused
    with every reason named."""
    from megatron_patch.hf.native import mixtral_refusals
    from megatron_patch.training.config import JobConfig

    save, export = tmp_path / "native", tmp_path / "hf"
    pretrain([*TINY, "--swiglu", "--train-iters", "3", "--data-path", tiny_hf.train,
              "--valid-data-path", tiny_hf.valid, "--tokenizer-model", str(tiny_hf.model),
              "--save", str(save)])
    tool = subprocess.run([sys.executable, "tools/export_hf.py", "--load", str(save),
                           "--hf-export", str(export), "--check"], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert tool.returncode == 0, tool.stdout[-2000:] + tool.stderr[-3000:]
    assert "ok (tolerance 0.0001)" in tool.stdout
    assert json.loads((export / "config.json").read_text())["model_type"] == "mixtral"
    _assert_generates(export)
    # tools/evaluate.py --load exports the checkpoint itself, then scores it.
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"prompt": "def add(a, b):", "answer": "3"}) + "\n")
    evaluated = subprocess.run([sys.executable, "tools/evaluate.py", "--load", str(save),
                                "--tasks", str(tasks), "--output-dir", str(tmp_path / "eval"),
                                "--max-new-tokens", "4", "--no-progress-bar"], cwd=REPO,
                               env=clean_env(), capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["tasks"]["tasks"]["items"] == 1
    assert (tmp_path / "eval" / "hf_export" / "config.json").is_file()

    refused = mixtral_refusals(JobConfig.from_flat({"normalization": "LayerNorm",
                                                    "tokenizer_model": "data/tokenizer.model"}))
    assert len(refused) == 3 and "--normalization LayerNorm" in refused[1]
    assert "not a Hugging Face tokenizer directory" in refused[0] and "--swiglu" in refused[2]
