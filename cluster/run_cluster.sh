#!/usr/bin/env bash
# Starts one node of a Strata Ray cluster inside a container, and stays in the foreground.
#
#   run_cluster.sh IMAGE HEAD_IP --head   HF_CACHE_PATH [extra docker args...]   # on the head node
#   run_cluster.sh IMAGE HEAD_IP --worker HF_CACHE_PATH [extra docker args...]   # on every other node
#
# The container uses the host's network (Ray, NCCL and gloo need the node's real addresses), all
# GPUs, a large /dev/shm (NCCL's shared-memory buffers) and locked memory (RDMA), and mounts the
# Hugging Face cache so every node reads the same weights. Extra arguments go to `docker run`, e.g.
# `-e STRATA_HOST_IP=10.0.0.2` to name this node's private address (Ray registers the node there,
# and Strata binds its listeners and points gloo/NCCL there). STRATA_HOST_IP, RAY_AUTH_MODE and
# RAY_AUTH_TOKEN set in this shell are passed through by name, so the token never shows in `ps`.
# Give every node the same token. Ctrl-C (or the end of this script) removes the container.
#
# Environment: RAY_PORT (default 6379), SHM_SIZE (default 10.24g).
set -euo pipefail

usage() {
    echo "usage: $0 IMAGE HEAD_IP --head|--worker HF_CACHE_PATH [extra docker args...]" >&2
    exit 2
}

[ "$#" -ge 4 ] || usage
image="$1"
head_ip="$2"
role="$3"
hf_cache="$4"
shift 4
case "$role" in
    --head | --worker) ;;
    *) echo "$0: the third argument must be --head or --worker, got '$role'" >&2; usage ;;
esac

ray_port="${RAY_PORT:-6379}"
container="strata-node-$(hostname -s)-$$"

cleanup() {
    docker rm -f "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # runs the EXIT trap

if [ "$role" = "--head" ]; then
    ray_args="--head --port=$ray_port"
else
    ray_args="--address=$head_ip:$ray_port"
fi

docker_args=(
    --name "$container"
    --network host
    --gpus all
    --shm-size "${SHM_SIZE:-10.24g}"
    --cap-add IPC_LOCK
    --ulimit memlock=-1
    -v "$hf_cache:/root/.cache/huggingface"
)
if [ -d /dev/infiniband ]; then
    docker_args+=(--device /dev/infiniband)  # RDMA for NCCL's NET/IB
fi
for var in STRATA_HOST_IP RAY_AUTH_MODE RAY_AUTH_TOKEN; do
    if [ -n "${!var:-}" ]; then
        docker_args+=(-e "$var")  # by name: the value comes from this environment, not the command line
    fi
done

# Runs inside the container, where STRATA_HOST_IP (from -e above or the extra args) is known.
# shellcheck disable=SC2016  # expanded by the container's shell, not this one
node_cmd='exec ray start --block '"$ray_args"' ${STRATA_HOST_IP:+--node-ip-address="$STRATA_HOST_IP"}'

docker run "${docker_args[@]}" "$@" --entrypoint /bin/bash "$image" -c "$node_cmd"
