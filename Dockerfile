# syntax=docker/dockerfile:1
# Multi-stage build: a Rust builder, then a small non-root runtime image.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin meshgate \
 && strip target/release/meshgate

FROM debian:bookworm-slim
# ca-certificates: the system roots that amqps:// (and tls:// NATS) connections verify against.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home meshgate
COPY --from=build /src/target/release/meshgate /usr/local/bin/meshgate
# Anonymous access off: the image serves nobody until it is given users (examples/docker.toml).
COPY examples/docker.toml /etc/meshgate/meshgate.toml
USER 10001
# 1883: MQTT, when enabled (MESHGATE__MQTT__ENABLED=true, MESHGATE__MQTT__LISTEN=0.0.0.0:1883).
EXPOSE 8080 9090 1883
HEALTHCHECK --interval=10s --timeout=2s CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3 && head -n1 <&3 | grep -q \" 200 \""]
ENTRYPOINT ["/usr/local/bin/meshgate"]
CMD ["run", "--config", "/etc/meshgate/meshgate.toml"]
