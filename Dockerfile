# syntax=docker/dockerfile:1
# meshserve: one image for every role (control plane, gateway, node, meshctl).
#   docker build -t meshserve:0.1.0 .
#   docker run --rm meshserve:0.1.0 meshserve-node --help
# Stage 1 builds the wheel of this checkout and collects the wheels of its dependencies;
# stage 2 installs them into a slim Python with no compiler, no build tools, no pip, and runs as
# an unprivileged user (uid/gid 10001, the one deploy/kubernetes and deploy/compose run as).

FROM python:3.11-slim AS build
WORKDIR /src
# Only what the wheel is made of (the package links in meshserve/ point at the top folders).
COPY pyproject.toml README.md ./
COPY meshserve ./meshserve
COPY client ./client
COPY common ./common
COPY controlplane ./controlplane
COPY devtools ./devtools
COPY node ./node
COPY protos ./protos
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels . \
    && ls /wheels/meshserve-*.whl

FROM python:3.11-slim AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 meshserve \
    && useradd --system --uid 10001 --gid meshserve --home-dir /var/lib/meshserve \
       --create-home --shell /usr/sbin/nologin meshserve \
    && mkdir -p /var/cache/meshserve && chown meshserve:meshserve /var/cache/meshserve
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links /wheels meshserve \
    && python -m pip uninstall --yes pip setuptools wheel
USER 10001:10001
WORKDIR /var/lib/meshserve
# 8001 control plane (NodeLink, Admin, feed, gateway), 8002 standalone gateway,
# 9001 a node's direct port, 9090 Prometheus metrics (--metrics-listen).
EXPOSE 8001 8002 9001 9090
# The default command is a control plane on an etcd named "etcd" (as in deploy/compose);
# the other roles name their console script: meshserve-gateway, meshserve-node, meshctl.
CMD ["meshserve-controlplane", "--listen=0.0.0.0:8001", "--etcd=http://etcd:2379", "--metrics-listen=0.0.0.0:9090"]
