# One image for every gpumeter service; docker-compose.yml picks the command.
FROM python:3.11-slim
WORKDIR /app
# A font with Traditional Chinese, for the invoice and credit note PDFs (services/billing/pdf.py).
RUN apt-get update && apt-get install -y --no-install-recommends fonts-wqy-microhei \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY services services
COPY gpumeter gpumeter
COPY deploy deploy
RUN pip install --no-cache-dir .
USER nobody
