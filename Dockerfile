# One image for every service: `heimdall api | projector | trainer | up | train CONFIG`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first (torch as pinned by pyproject.toml), so a code change reuses this layer.
COPY pyproject.toml ./
RUN mkdir shared services heimdall_cli \
    && touch shared/__init__.py services/__init__.py heimdall_cli/__init__.py \
    && pip install . \
    && pip uninstall -y heimdall-training \
    && rm -rf shared services heimdall_cli build *.egg-info

COPY shared ./shared
COPY services ./services
COPY heimdall_cli ./heimdall_cli
RUN pip install --no-deps . && rm -rf build *.egg-info

# The artifacts folder exists in the image so a fresh named volume inherits its owner.
RUN useradd --create-home --uid 1000 heimdall \
    && mkdir -p /data/artifacts \
    && chown -R heimdall:heimdall /data
USER heimdall
ENV HEIMDALL_DATA_DIR=/data \
    HEIMDALL_ARTIFACTS_DIR=/data/artifacts

EXPOSE 8001
ENTRYPOINT ["heimdall"]
CMD ["up"]
