# mmserve on the bundled demo model (CPU). Build: docker build -t mmserve .   Run: docker-compose up
FROM python:3.11-slim
WORKDIR /srv/mmserve
COPY pyproject.toml README.md ./
COPY app ./app
COPY vision ./vision
COPY llm ./llm
COPY cache ./cache
COPY demo ./demo
COPY models ./models
# The code is root's and read-only to the server; the server runs as `mmserve` (uid 10001), which owns only
# /data: the batch database, the audit log, keys and usage, the feature cache. A named volume mounted on
# /data starts as a copy of this directory, owner included, so the user can write it from the first start.
RUN pip install --no-cache-dir -e . \
    && groupadd --system --gid 10001 mmserve \
    && useradd --system --uid 10001 --gid mmserve --home-dir /data --no-create-home mmserve \
    && mkdir -p /data/feature-cache /data/audit \
    && chown -R mmserve:mmserve /data
USER mmserve
ENV MMSERVE_HOST=0.0.0.0 MMSERVE_PORT=8000 MMSERVE_DATA_DIR=/data MMSERVE_FEATURE_CACHE_DIR=/data/feature-cache \
    HOME=/data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"
CMD ["mmserve", "serve"]
