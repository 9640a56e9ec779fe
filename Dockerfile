# Multi-stage build of streamscore (used by docker-compose.yml).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY tests tests
COPY topics topics
COPY config config
COPY docs docs
RUN cargo build --release --bin streamscore

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/streamscore /usr/local/bin/streamscore
COPY models /app/models
COPY config /app/config
WORKDIR /app
ENTRYPOINT ["streamscore"]
CMD ["--config", "/app/config/streamscore.toml", "run"]
