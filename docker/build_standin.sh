#!/usr/bin/env bash
# Build docker/Dockerfile with podman against a STAND-IN for nvidia/cuda:13.0.1-base-ubuntu24.04,
# then run the image's own checks: the demo (its CMD) as uid 10001 into a mounted volume, and the
# HEALTHCHECK in a one-shot `run_encode.py` container, in a `ray start --head` container, and with
# Ray down. For machines that reach Ubuntu's archive and PyPI but not Docker Hub / nvcr.io.
# What the stand-in lacks compared to the real base: docker/README.md, "Building without Docker Hub".
# A record of one run: docs/docker_build.md.
#
#   sudo docker/build_standin.sh            # everything: deps, rootfs, standin, build, demo, health
#   sudo docker/build_standin.sh build      # or one step (each step is idempotent; the later ones
#                                           # need the earlier ones' results)
#
# Needs root (debootstrap, rootful podman) on Debian 12 (bookworm) or similar, ~20 GB free under
# /var/lib/containers and WORK. Settings (environment):
#   WORK      scratch folder for the root file system and logs   (default /var/tmp/painterbot-standin)
#   IMAGE     tag of the built image                             (default localhost/painterbot:0.1.0-standin)
#   MIRROR    Ubuntu archive                                     (default http://archive.ubuntu.com/ubuntu)
#   REBUILD=1 rebuild the stand-in base even if it exists
#   NO_CACHE=1 build the image without podman's layer cache (a clean, timed build)
#   CA_BUNDLE a CA bundle for pip inside the build (default: $PIP_CERT if set). For hosts whose
#             HTTPS goes through an intercepting proxy with its own CA (these machines): the bundle
#             and an /etc/pip.conf naming it are bind-mounted into every RUN (`podman build -v`),
#             so they are in no layer and the Dockerfile stays as it is for a normal build. The
#             mount points (an empty /etc/pip.conf, an empty /etc/standin-build-ca/) are part of the
#             stand-in base: buildah would otherwise leave an empty file for each in the image.
#
# Podman on these machines (Debian 12, no systemd in the session, cgroup v1):
#   --runtime runc       runc (Debian package `runc`), named explicitly
#   --ulimit nofile/nproc explicit limits: without them every container fails to start with
#                        "error setting rlimit type 7: operation not permitted" (7 = RLIMIT_NOFILE)
#   --format docker      the default OCI image format drops HEALTHCHECK (and warns); docker keeps it
#   `podman healthcheck run` runs the HEALTHCHECK by hand (without systemd no timer runs it)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
WORK=${WORK:-/var/tmp/painterbot-standin}
IMAGE=${IMAGE:-localhost/painterbot:0.1.0-standin}
STANDIN=${STANDIN:-localhost/painterbot-standin/cuda:13.0.1-base-ubuntu24.04}
MIRROR=${MIRROR:-http://archive.ubuntu.com/ubuntu}
SUITE=noble                      # Ubuntu 24.04, what nvidia/cuda:*-ubuntu24.04 is built on
# Ubuntu's archive key (Debian 12's archive has no ubuntu-keyring package): the .deb from the archive, checked
# against this hash (noble's Packages index, ubuntu-keyring 2023.11.28.1).
KEYRING_DEB=pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb
KEYRING_SHA256=36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8

PODMAN=(podman --runtime runc)
ULIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
LOG=$WORK/logs
mkdir -p "$WORK" "$LOG"

say() { printf '\n[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

step_deps() {
    say "host packages"
    local need=()
    for cmd_pkg in podman:podman runc:runc debootstrap:debootstrap zstd:zstd fuse-overlayfs:fuse-overlayfs \
                   newuidmap:uidmap curl:curl; do
        command -v "${cmd_pkg%%:*}" >/dev/null || need+=("${cmd_pkg#*:}")
    done
    if ((${#need[@]})); then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    fi
    podman --version; runc --version | head -1; debootstrap --version
}

step_rootfs() {
    # Ubuntu 24.04 minbase, the same package set as the official ubuntu:24.04 image's root file
    # system (which is what nvidia/cuda:13.0.1-base-ubuntu24.04 starts FROM).
    local rootfs=$WORK/rootfs
    if [[ -f $rootfs/.complete && -z ${REBUILD:-} ]]; then say "rootfs: $rootfs exists"; return; fi
    say "rootfs: debootstrap $SUITE from $MIRROR"
    if mountpoint -q "$rootfs/proc"; then umount "$rootfs/proc"; fi     # left by an interrupted run
    rm -rf --one-file-system "$rootfs" "$WORK/keyring"
    mkdir -p "$WORK/keyring"
    curl -fsSL -o "$WORK/keyring/ubuntu-keyring.deb" "$MIRROR/$KEYRING_DEB"
    echo "$KEYRING_SHA256  $WORK/keyring/ubuntu-keyring.deb" | sha256sum -c -
    dpkg-deb -x "$WORK/keyring/ubuntu-keyring.deb" "$WORK/keyring"
    # Debian 12's debootstrap has no `noble` script; Ubuntu's scripts are all the same (gutsy).
    local script=/usr/share/debootstrap/scripts/$SUITE
    [[ -e $script ]] || script=/usr/share/debootstrap/scripts/gutsy
    debootstrap --variant=minbase --keyring="$WORK/keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg" \
        "$SUITE" "$rootfs" "$MIRROR" "$script" >"$LOG/debootstrap.log" 2>&1 \
        || { tail -20 "$LOG/debootstrap.log"; exit 1; }
    # apt sources as in ubuntu:24.04 (deb822, with -updates and -security, so `apt-get install` in the
    # Dockerfile gets today's packages, as it would on the real base)
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/ubuntu.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates $SUITE-backports
Components: main universe restricted multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg

Types: deb
URIs: http://security.ubuntu.com/ubuntu/
Suites: $SUITE-security
Components: main universe restricted multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg
EOF
    # today's -updates/-security versions of the base packages, as in Canonical's ubuntu:24.04 image
    # (rebuilt with the updates), not the April 2024 release versions debootstrap installs.
    # (debootstrap 1.0.128's --extra-suites fails here: "Failure trying to run: chroot ... dpkg --install".)
    mount -t proc proc "$rootfs/proc"
    chroot "$rootfs" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -y -qq \
        -o Dpkg::Options::=--force-confold upgrade && apt-get clean' >"$LOG/upgrade.log" 2>&1 \
        || { umount "$rootfs/proc"; tail -20 "$LOG/upgrade.log"; exit 1; }
    umount "$rootfs/proc"
    echo "rootfs: $(grep -c '^Setting up' "$LOG/upgrade.log" || true) packages set up by the upgrade (log: $LOG/upgrade.log)"
    # mount points for CA_BUNDLE (step_build): empty, so without the mounts they change nothing
    : >"$rootfs/etc/pip.conf"
    mkdir -p "$rootfs/etc/standin-build-ca"
    # what Docker's ubuntu images do: no apt lists or caches in the image
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    touch "$rootfs/.complete"
}

step_standin() {
    if "${PODMAN[@]}" image exists "$STANDIN" && [[ -z ${REBUILD:-} ]]; then say "standin: $STANDIN exists"; return; fi
    say "standin: import $WORK/rootfs as $STANDIN with nvidia/cuda:13.0.1-base-ubuntu24.04's environment"
    # The environment of the real base (NVIDIA's dist/13.0.1/ubuntu2404/base/Dockerfile). NVIDIA_REQUIRE_CUDA
    # is abridged (the real one adds a list of driver branches), and nothing here installs
    # cuda-cudart-13-0 / cuda-compat-13-0 (NVIDIA's apt repo cannot be reached from these machines).
    tar -C "$WORK/rootfs" --exclude=./.complete -c . | "${PODMAN[@]}" import \
        --change 'ENV PATH=/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV NVARCH=x86_64' \
        --change 'ENV NVIDIA_REQUIRE_CUDA=cuda>=13.0' \
        --change 'ENV NV_CUDA_CUDART_VERSION=13.0.88-1' \
        --change 'ENV CUDA_VERSION=13.0.1' \
        --change 'ENV LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64' \
        --change 'ENV NVIDIA_VISIBLE_DEVICES=all' \
        --change 'ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility' \
        --change 'CMD ["/bin/bash"]' \
        - "$STANDIN"
}

step_build() {
    say "build: $IMAGE from $REPO (log: $LOG/build.log)"
    local t0=$SECONDS ca=${CA_BUNDLE:-${PIP_CERT:-}} mounts=()
    if [[ -n $ca ]]; then
        mkdir -p "$WORK/build-ca"
        cp "$(readlink -f "$ca")" "$WORK/build-ca/ca.crt"
        printf '[global]\ncert = /etc/standin-build-ca/ca.crt\n' >"$WORK/pip.conf"
        mounts=(-v "$WORK/build-ca:/etc/standin-build-ca:ro" -v "$WORK/pip.conf:/etc/pip.conf:ro")
        echo "build: pip inside the build trusts $ca (bind mounts, not in the image)"
    fi
    # --ignorefile: podman 4.3 does not read <Dockerfile>.dockerignore by itself (BuildKit does).
    # --layers: keep the layer cache so a rerun after a small change is quick. Caveat (buildah
    # 1.28): the cache key of the runtime stage's install RUN does not cover the content of its
    # --mount=from=builder, so after a change to encoder/ or pipeline/ the venv keeps the old
    # painterbot wheel (harmless at run time: PYTHONPATH=/app imports the fresh /app copy). Build an
    # image to ship with NO_CACHE=1 (no cache at all).
    local cache=(--layers)
    [[ -n ${NO_CACHE:-} ]] && cache=(--no-cache)
    "${PODMAN[@]}" build --format docker "${cache[@]}" \
        "${ULIMITS[@]}" "${mounts[@]}" \
        --ignorefile "$REPO/docker/Dockerfile.dockerignore" \
        --build-arg BASE_IMAGE="$STANDIN" \
        -f "$REPO/docker/Dockerfile" -t "$IMAGE" "$REPO" 2>&1 | tee "$LOG/build.log"
    local rc=${PIPESTATUS[0]}
    echo "build: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG/build.log"
    ((rc == 0)) || exit "$rc"
    "${PODMAN[@]}" image inspect "$IMAGE" --format 'size: {{.Size}} bytes; user: {{.Config.User}}; workdir: {{.Config.WorkingDir}}; cmd: {{.Config.Cmd}}; healthcheck: {{.Config.Healthcheck}}' \
        | tee -a "$LOG/build.log"
    "${PODMAN[@]}" images "$IMAGE"
}

step_demo() {
    local out=$WORK/demo-volume t0=$SECONDS
    say "demo: python run_encode.py --demo, /data mounted from $out (log: $LOG/demo.log)"
    rm -rf "$out"
    install -d -o 10001 -g 10001 "$out"       # the image's user must be able to write the volume
    # --shm-size: Ray's object store (docker/README.md); the demo on 2 CPU cores takes minutes.
    "${PODMAN[@]}" run --rm "${ULIMITS[@]}" --shm-size=2g -v "$out:/data" "$IMAGE" \
        python run_encode.py --demo 2>&1 | tee "$LOG/demo.log"
    local rc=${PIPESTATUS[0]}
    echo "demo: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG/demo.log"
    ((rc == 0)) || exit "$rc"
    # what it wrote, with owners (uid 10001 = the image's user)
    find "$out" -maxdepth 3 -printf '%u:%g %M %p\n' | sort -k3 | tee -a "$LOG/demo.log"
    [[ -n $(find "$out/demo_out/strokes" -name '*.parquet' -user 10001) ]]
}

health() { # container -> prints what `podman healthcheck run` says; 0 healthy, 1 unhealthy, 2 other
    local rc=0 out
    out=$("${PODMAN[@]}" healthcheck run "$1" 2>&1) || rc=$?
    out=$(grep -v 'level=' <<<"$out" | tr '\n' ' ')
    case $rc in
        0) echo "   podman healthcheck run: exit 0 (healthy) ${out}"; return 0 ;;
        1) echo "   podman healthcheck run: exit 1 (unhealthy) ${out}"; return 1 ;;
        *) echo "   podman healthcheck run: exit $rc (no verdict: ${out})"; return 2 ;;
    esac
}

wait_healthy() { # container seconds
    local i
    for ((i = 0; i < $2; i += 2)); do
        health "$1" >/dev/null && { health "$1"; return 0; }
        sleep 2
    done
    health "$1"
}

expect_unhealthy() { # container: exactly "unhealthy" (exit 1) counts, not a container that is gone
    local rc=0
    health "$1" || rc=$?
    ((rc == 1))
}

state() { "${PODMAN[@]}" inspect "$1" --format '   container: {{.State.Status}} (exit code {{.State.ExitCode}})'; }

rm_container() { "${PODMAN[@]}" rm -f -t 0 "$1" >/dev/null 2>&1 || true; }

step_health() {
    say "health (log: $LOG/health.log)"
    {
        local ok=1 rc
        local head=(ray start --head --num-cpus=1 --include-dashboard=false --disable-usage-stats)
        local tok=$WORK/ray_token
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$tok"; chmod 0644 "$tok"
        local token_env=(-e RAY_AUTH_MODE=token -e RAY_AUTH_TOKEN_PATH=/run/secrets/ray_token
                         -v "$tok:/run/secrets/ray_token:ro")
        for c in pb-hc-oneshot pb-hc-head pb-hc-tokenhead pb-hc-down pb-hc-none; do rm_container "$c"; done

        echo "== 1. one-shot container: the image's CMD (run_encode.py --demo), no volume; Ray started by"
        echo "   ray.init() in the driver, which turns token auth on and writes ~/.ray/auth_token"
        "${PODMAN[@]}" run -d --name pb-hc-oneshot "${ULIMITS[@]}" --shm-size=2g "$IMAGE" >/dev/null
        echo "   right after the start, Ray not up yet:"
        expect_unhealthy pb-hc-oneshot || ok=0
        echo "   once Ray is up:"
        wait_healthy pb-hc-oneshot 180 || ok=0
        # shellcheck disable=SC2016  # $HOME of the container, expanded there
        "${PODMAN[@]}" exec pb-hc-oneshot sh -c 'ls -l "$HOME/.ray/auth_token"' | sed 's/^/   token: /' || true
        rc=0
        "${PODMAN[@]}" exec pb-hc-oneshot ray health-check >"$LOG/bare-cli.log" 2>&1 || rc=$?
        echo "   for comparison, the bare 'ray health-check' (the old HEALTHCHECK): exit $rc"
        grep -o 'InvalidAuthToken[^.]*\.[^.]*RAY_AUTH_MODE is currently [^ ]*' "$LOG/bare-cli.log" | head -1 | sed 's/^/     /'
        echo "   waiting for the demo to finish ..."
        rc=$("${PODMAN[@]}" wait pb-hc-oneshot)
        echo "   the CMD exited with $rc; among what it wrote in the container:"
        "${PODMAN[@]}" diff pb-hc-oneshot | grep -E '^A /data/demo_out/(strokes/[^/]*\.parquet|gallery\.html)$' | sed 's/^/     /'
        [[ $rc == 0 ]] || ok=0
        rm_container pb-hc-oneshot

        echo "== 2. 'ray start --head --block' as the container's command, no token anywhere (auth off)"
        "${PODMAN[@]}" run -d --name pb-hc-head "${ULIMITS[@]}" --shm-size=2g "$IMAGE" "${head[@]}" --block >/dev/null
        wait_healthy pb-hc-head 120 || ok=0
        echo "   after 'ray stop' (with --block the container's command then ends):"
        "${PODMAN[@]}" exec pb-hc-head ray stop --force >/dev/null 2>&1 || true
        sleep 5
        state pb-hc-head
        rm_container pb-hc-head

        echo "== 3. the same with a token (docker/README.md (b): RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH)"
        "${PODMAN[@]}" run -d --name pb-hc-tokenhead "${ULIMITS[@]}" --shm-size=2g "${token_env[@]}" "$IMAGE" \
            "${head[@]}" --block >/dev/null
        wait_healthy pb-hc-tokenhead 120 || ok=0
        rm_container pb-hc-tokenhead

        echo "== 4. Ray down in a running container: heads started by 'ray start --head' (no --block) in"
        echo "   containers that keep running, then 'ray stop'"
        local variant
        for variant in plain token; do
            local opts=()
            [[ $variant == token ]] && opts=("${token_env[@]}")
            "${PODMAN[@]}" run -d --name pb-hc-down "${ULIMITS[@]}" --shm-size=2g "${opts[@]}" "$IMAGE" \
                sh -c "${head[*]} && exec sleep infinity" >/dev/null
            echo "   $variant head up:"
            wait_healthy pb-hc-down 120 || ok=0
            "${PODMAN[@]}" exec pb-hc-down ray stop --force >/dev/null 2>&1 || true
            sleep 3
            echo "   $variant head after 'ray stop':"
            state pb-hc-down
            expect_unhealthy pb-hc-down || ok=0
            rm_container pb-hc-down
        done

        echo "== 5. a container in which Ray never started (sleep infinity)"
        "${PODMAN[@]}" run -d --name pb-hc-none "${ULIMITS[@]}" "$IMAGE" sleep infinity >/dev/null
        expect_unhealthy pb-hc-none || ok=0
        rm_container pb-hc-none

        if ((ok)); then echo "health: all as expected"; else echo "health: NOT as expected"; exit 1; fi
    } 2>&1 | grep --line-buffered -v 'level=error msg="unable to get systemd connection' | tee "$LOG/health.log"
    return "${PIPESTATUS[0]}"
}

steps=("$@")
((${#steps[@]})) || steps=(deps rootfs standin build demo health)
for s in "${steps[@]}"; do
    case $s in
        deps|rootfs|standin|build|demo|health) "step_$s" ;;
        *) echo "unknown step: $s (deps rootfs standin build demo health)" >&2; exit 2 ;;
    esac
done
