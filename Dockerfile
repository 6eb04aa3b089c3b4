# GPU image: NVIDIA's NGC PyTorch container (CUDA, NCCL, Transformer Engine, apex) + this project.
# Build:  docker build -t megatron-patch .
# Run:    docker run --gpus all --ipc=host --ulimit memlock=-1 --rm -it \
#             -v "$PWD/data:/workspace/megatron_patch/data" megatron-patch \
#             examples/pretrain/run_pretrain_moe.sh deepseek_moe_1b.h100x8
FROM nvcr.io/nvidia/pytorch:25.04-py3

WORKDIR /workspace/megatron_patch

# The same install steps as `make install` (Makefile), minus requirements-torch.txt: the image's
# own PyTorch build (with its CUDA, NCCL and Transformer Engine) is kept.
COPY requirements.txt requirements-torch.txt requirements-test.txt requirements-deepspeed.txt \
     pyproject.toml README.md ./
COPY megatron_patch ./megatron_patch
RUN python -m pip install --no-cache-dir -r requirements.txt \
    && python -m pip install --no-cache-dir --no-deps --no-build-isolation -r requirements-deepspeed.txt \
    && python -m pip install --no-cache-dir --no-deps -e .

COPY examples ./examples
COPY tools ./tools

ENV PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PYTHON=python

CMD ["bash"]
