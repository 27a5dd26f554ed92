# One image for every taskwheel service: docker-compose.yml runs it as
# `taskwheel serve ingest|timer|dispatch ...`.
#
# The build stage compiles the Cython core (it needs a C compiler and SQLite's header); the
# runtime stage gets only the resulting wheels (and the image's own libsqlite3).
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libsqlite3-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY core core
COPY protos protos
COPY services services
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --create-home taskwheel
USER taskwheel
WORKDIR /home/taskwheel
CMD ["taskwheel", "--help"]
