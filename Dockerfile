# One image for every gpumeter service; docker-compose.yml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY services services
COPY gpumeter gpumeter
COPY deploy deploy
RUN pip install --no-cache-dir .
USER nobody
