# One image for api, worker and migrate; they differ only by command.
# CPU by default; for GPUs: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DISTILL_HOME=/var/lib/distill DISTILL_DATA_DIR=/var/lib/distill/data

RUN useradd --create-home --uid 10001 distill
WORKDIR /srv/distill

# torch first, from the chosen index, so that `pip install .` finds it satisfied; its version
# requirement is read from pyproject.toml, the one place it is stated.
COPY pyproject.toml ./
RUN pip install --index-url "${TORCH_INDEX}" "$(python -c 'import tomllib; print(next(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if d.startswith("torch")))')"
COPY README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install . && mkdir -p /var/lib/distill && chown distill /var/lib/distill

USER distill
EXPOSE 8000
CMD ["distill", "api", "--host", "0.0.0.0", "--port", "8000"]
