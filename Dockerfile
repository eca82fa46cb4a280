FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 GATEWAY_PORT=8080 \
    GATEWAY_DATABASE_URL=sqlite:////data/gateway.db \
    GATEWAY_CONFIG=/app/config/gateway.toml

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY config ./config
RUN pip install --no-cache-dir . && useradd --system --uid 10001 gateway && mkdir /data && chown gateway /data

USER gateway
VOLUME ["/data"]
EXPOSE 8080
CMD ["gateway", "serve"]
