# GPU image: NVIDIA's NGC PyTorch container (Python 3.12, CUDA, NCCL, Transformer Engine, apex)
# + megatron-core 0.19.2 + this project. 25.11 (PyTorch 2.10, CUDA 13.0) rather than the newest
# release, as megatron-core's installation guide advises; any NGC PyTorch release with Python 3.12
# works (pass --build-arg BASE=...), since the image's PyTorch is kept as it is.
# Build:  docker build -t megatron-patch .
# Run:    docker run --gpus all --ipc=host --ulimit memlock=-1 --rm -it \
#             -v "$PWD/data:/workspace/megatron_patch/data" megatron-patch \
#             examples/pretrain/run_pretrain_moe.sh deepseek_moe_1b.h100x8
ARG BASE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE}

WORKDIR /workspace/megatron_patch

# The install steps of `make install` (Makefile) with the latest megatron-core and without
# requirements-torch*.txt: the image's own PyTorch build (with its CUDA, NCCL, triton and
# Transformer Engine) satisfies every requirement on torch and is never replaced.
COPY requirements.txt requirements-megatron-latest.txt requirements-deepspeed.txt \
     requirements-hf.txt pyproject.toml README.md ./
COPY megatron_patch ./megatron_patch
RUN python -m pip install --no-cache-dir -r requirements.txt -r requirements-megatron-latest.txt \
        -r requirements-hf.txt \
    && python -m pip install --no-cache-dir --no-deps --no-build-isolation -r requirements-deepspeed.txt \
    && python -m pip install --no-cache-dir --no-deps -e .

COPY examples ./examples
COPY tools ./tools

ENV PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PYTHON=python

CMD ["bash"]
