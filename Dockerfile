# One image for every container of docker-compose.yml: the load balancer (`zdlb run`) and the
# demo app hosts (`zdlb demo-app`). Two stages, so the image holds the installed package and its
# dependencies, not the source tree or the build's leftovers.

FROM python:3.11-slim AS build
WORKDIR /src
# pyproject.toml names README.md as the package's readme: the build reads it.
COPY pyproject.toml README.md ./
COPY zdlb ./zdlb
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# uvloop and httptools come as manylinux wheels for this image: no compiler needed.
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl && rm -rf /tmp/wheels
# Not root: zdlb binds no privileged port. It owns the control socket's directory and the state
# journal's; an empty named volume mounted on either starts with this owner.
RUN useradd --system --user-group --uid 10001 --no-create-home --shell /usr/sbin/nologin zdlb \
    && install -d -o zdlb -g zdlb -m 0750 /run/zdlb /var/lib/zdlb
USER zdlb
WORKDIR /var/lib/zdlb
# 8000: the balancer's listener (deploy/compose.toml); 8081, 8091, 8082, 8092: the demo hosts'
# main and backup vhosts (`zdlb demo-app`).
EXPOSE 8000 8081 8091 8082 8092
# No HEALTHCHECK: the image plays two roles, so docker-compose.yml gives the balancer its own
# (`zdlb ctl ... show info`), and the balancer's HTTP checks watch the app hosts.
ENTRYPOINT ["zdlb"]
CMD ["--help"]
