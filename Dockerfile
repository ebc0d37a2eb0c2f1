# kiln: build the binary, then run it on a slim Debian with PostgreSQL's binaries available
# (so the embedded database works when DATABASE_URL is not set).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
# Embedded in the binary: the API reference served at /docs.
COPY openapi.yaml ./
# Embedded in the binary: the dashboard served at /.
COPY web ./web
RUN cargo build --release --locked && strip target/release/kiln

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --home-dir /var/lib/kiln kiln
COPY --from=build /src/target/release/kiln /usr/local/bin/kiln
USER kiln
WORKDIR /var/lib/kiln
ENV KILN_ADDR=0.0.0.0:8080 \
    KILN_DATA_DIR=/var/lib/kiln/data
VOLUME ["/var/lib/kiln/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q '200 OK' <&3"]
ENTRYPOINT ["kiln"]
CMD ["serve"]
