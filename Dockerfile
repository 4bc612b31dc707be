# ticketd container image: Debian 12 slim, two stages.
#   docker build -t ticketd .
#   docker run --rm -p 8080:8080 -e DATABASE_URL=... -e KAFKA_BROKERS=... ticketd
# The build stage installs its packages with the same script the README and the tests use
# (deps/install-packages.sh) and builds with CMake; the final stage holds only the runtime
# shared libraries and the binary, and runs as an unprivileged user.
# test/integration/test_deploy_manifests.py checks this file against the code (port,
# package script, healthcheck); see deploy/README.md.

FROM debian:12-slim AS build
WORKDIR /src
# The package script first, so the layer with the toolchain is cached across source edits.
COPY deps/install-packages.sh deps/install-packages.sh
RUN deps/install-packages.sh --build && rm -rf /var/lib/apt/lists/*
COPY . .
# The configuration of test/run's release stage (the one the test suite runs against).
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo \
          -DTICKETD_WERROR=ON -DTICKETD_SANITIZE=OFF -DTICKETD_FUZZ=OFF \
 && cmake --build build -j"$(nproc)" --target ticketd \
 && strip build/ticketd \
 && build/ticketd config-table > /dev/null

FROM debian:12-slim
COPY deps/install-packages.sh /tmp/install-packages.sh
RUN /tmp/install-packages.sh --runtime \
 && rm -rf /var/lib/apt/lists/* /tmp/install-packages.sh \
 && groupadd --system --gid 10001 ticketd \
 && useradd --system --uid 10001 --gid ticketd --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin ticketd
COPY --from=build /src/build/ticketd /usr/local/bin/ticketd
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
ENV LISTEN=0.0.0.0:8080
EXPOSE 8080
# No curl in the image: bash's /dev/tcp sends GET /healthz to the port of $LISTEN and the
# check passes only on "HTTP/1.x 200". Kubernetes ignores HEALTHCHECK and uses the probes
# in deploy/k8s/deployment.yaml.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["bash", "-c", "port=${LISTEN##*:}; exec 3<>/dev/tcp/127.0.0.1/${port:-8080} && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r -t 2 proto code rest <&3 && [ \"$code\" = 200 ]"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["ticketd"]
CMD ["serve"]
