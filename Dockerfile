# mmserve on the bundled demo model (CPU). Build: docker build -t mmserve .
FROM python:3.11-slim
WORKDIR /srv/mmserve
COPY pyproject.toml README.md ./
COPY app ./app
COPY vision ./vision
COPY llm ./llm
COPY cache ./cache
COPY demo ./demo
COPY models ./models
RUN pip install --no-cache-dir -e . \
    && useradd --system --home /srv/mmserve mmserve
USER mmserve
ENV MMSERVE_HOST=0.0.0.0 MMSERVE_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"
CMD ["mmserve", "serve"]
