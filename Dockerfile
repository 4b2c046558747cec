# chunkflow on NVIDIA's PyTorch container (GPU). Build and run: docs/install.md.
#
#   docker build -t chunkflow .
#   docker run --gpus all --ipc=host --rm chunkflow \
#       torchrun --nproc-per-node 8 scripts/finetune.py --config configs/qwen7b_32k.yaml
#
# The image's torch, transformer-engine, flash-attn and NCCL are kept as they are: nothing
# below lets pip resolve torch (megatron-core and chunkflow go in with --no-deps, their
# other dependencies are listed here), and the build fails if torch changed anyway.
# tests/test_dockerfile.py checks these pins against pyproject.toml.

# NGC PyTorch 25.12: torch 2.10.0a0, Python 3.12, CUDA 13.1, transformer-engine.
FROM nvcr.io/nvidia/pytorch:25.12-py3

ARG MEGATRON_CORE_VERSION=0.19.2
# Used only if the image lacks them; both build against its torch. The pair of
# pyproject.toml's [gpu] extra (transformer-engine 2.10.0 is 25.12's own, for CUDA 13).
ARG TRANSFORMER_ENGINE_VERSION=2.10.0
ARG FLASH_ATTN_VERSION=2.8.3

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/chunkflow

RUN python -c "import torch; print(torch.__version__)" > /tmp/torch-version

# megatron-core needs torch (kept), numpy and packaging; chunkflow's own dependencies are
# pyproject.toml's minus torch and megatron-core, with the same bounds.
RUN pip install --no-deps "megatron-core==${MEGATRON_CORE_VERSION}" \
 && pip install "numpy>=1.24" "pyyaml>=6.0" "psutil>=5.9" "tokenizers>=0.15" "packaging>=24.2" "safetensors>=0.4" "jinja2>=3.1.6"

RUN python -c "import transformer_engine.pytorch" 2>/dev/null \
 || pip install --no-build-isolation "transformer-engine[pytorch,core_cu13]==${TRANSFORMER_ENGINE_VERSION}"
RUN python -c "import flash_attn" 2>/dev/null \
 || pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"

COPY . .
RUN pip install --no-deps --no-build-isolation -e .

# The image's torch is still the one in use, and everything imports.
RUN python -c "import torch; print(torch.__version__)" | diff /tmp/torch-version - \
 && python -c "import chunkflow, megatron.core, transformer_engine.pytorch, flash_attn; \
print('chunkflow on megatron-core', megatron.core.__version__)"
