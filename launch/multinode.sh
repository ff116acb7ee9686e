#!/usr/bin/env bash
# SHA-RNN on several machines without a scheduler: one `accelerate launch` per host over ssh (launch/node.sh),
# machine rank = the host's position in the list, rendezvous at the first host.
#
#   launch/multinode.sh node1 node2 -- --lr_scaling sqrt       # hosts, then arguments for `-m train`
#   launch/multinode.sh --hostfile hosts.txt                    # one host per line ("host slots=8" is fine)
#   launch/multinode.sh --print node1 node2                     # print each host's command, run nothing
#
# Every host needs password-less ssh (BatchMode), this repository and its environment at the same path, and
# DATA and OUT on a filesystem they all see. Environment: PRESET [paper], DATA [data/enwik8],
# OUT [runs/$PRESET], CONFIG [launch/multinode_ddp.yaml], NGPU [GPUs per host: slots= of the hostfile,
# else what nvidia-smi lists here], PORT [29500], MAIN_ADDR [first host], JOIN_TIMEOUT [600],
# SSH [ssh -o BatchMode=yes], DRY_RUN=1 (same as --print).
#
# Each host's output is prefixed with its rank. Runs are started with --resume auto: after an interruption,
# run the same command again. Ctrl-C or SIGTERM to this script stops the run cleanly: it creates
# $OUT/.stop-multinode-$PORT; the first host's node.sh sees it and signals its training processes, and every
# rank checkpoints and exits 0. The exit status is 0 only when every host's launcher exited 0.
set -euo pipefail

die() { echo "multinode.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hosts=()
hostfile=""
print_only=${DRY_RUN:-0}
while (($#)); do
    case $1 in
        --print | --dry-run) print_only=1 ;;
        --hostfile) hostfile=${2:?--hostfile needs a file}; shift ;;
        --hostfile=*) hostfile=${1#*=} ;;
        -h | --help) usage 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (arguments for training go after --)" ;;
        *) hosts+=("$1") ;;
    esac
    shift
done
slots=""
if [[ -n $hostfile ]]; then
    [[ -f $hostfile ]] || die "no hostfile $hostfile"
    while read -r host rest; do
        [[ -z $host || $host == \#* ]] && continue
        hosts+=("$host")
        if [[ -z $slots && $rest =~ slots=([0-9]+) ]]; then slots=${BASH_REMATCH[1]}; fi
    done <"$hostfile"
fi
((${#hosts[@]})) || usage 2

cd "$REPO"
export NNODES=${#hosts[@]}
export MAIN_ADDR=${MAIN_ADDR:-${hosts[0]}}
if [[ -z ${NGPU:-} ]]; then
    NGPU=$slots
    if [[ -z $NGPU ]] && command -v nvidia-smi >/dev/null 2>&1; then
        NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
fi
[[ ${NGPU:-} =~ ^[1-9][0-9]*$ ]] || die "set NGPU to the number of GPUs per host"
export NGPU
export PORT=${PORT:-29500}
export PRESET=${PRESET:-paper}
export DATA=${DATA:-data/enwik8}
export OUT=${OUT:-runs/$PRESET}
export CONFIG=${CONFIG:-launch/multinode_ddp.yaml}
export JOIN_TIMEOUT=${JOIN_TIMEOUT:-600}
export STOP_FILE=$OUT/.stop-multinode-$PORT
if ((print_only)); then
    for rank in "${!hosts[@]}"; do
        echo "# on ${hosts[rank]}:"
        MACHINE_RANK=$rank DRY_RUN=1 bash launch/node.sh "$@" | grep -v '^#'
    done
    exit 0
fi

# The same accelerate as here (the remote login shell may not have the environment activated).
ACCELERATE=${ACCELERATE:-$(command -v accelerate || echo accelerate)}
export ACCELERATE
# What every host gets: node.sh's settings, and whatever of the caller's environment the run depends on.
forward=(NNODES MAIN_ADDR NGPU PORT PRESET DATA OUT CONFIG JOIN_TIMEOUT STOP_FILE ACCELERATE)
for name in PYTHONPATH OMP_NUM_THREADS CUDA_VISIBLE_DEVICES \
        $(compgen -e | grep -E '^(NCCL|GLOO|TORCH)_' || true); do
    [[ -n ${!name:-} ]] && forward+=("$name")
done
read -r -a ssh_cmd <<<"${SSH:-ssh -o BatchMode=yes}"
detach=()
if command -v setsid >/dev/null 2>&1; then detach=(setsid --wait); fi

mkdir -p "$OUT"
rm -f "$STOP_FILE"
# shellcheck disable=SC2317  # called by the trap
stop() {
    echo "multinode.sh: stopping: every rank checkpoints and exits" >&2
    touch "$STOP_FILE" || echo "multinode.sh: cannot create $STOP_FILE: the run is not stopped" >&2
}
trap stop INT TERM

pids=()
for rank in "${!hosts[@]}"; do
    env_args=("MACHINE_RANK=$rank")
    for name in "${forward[@]}"; do env_args+=("$name=${!name}"); done
    remote="cd $(printf '%q' "$REPO") && env $(printf '%q ' "${env_args[@]}")"
    remote+="bash launch/node.sh $(printf '%q ' "$@")"
    # setsid: a Ctrl-C in this terminal must reach this script only, not the ssh clients (which would drop the
    # connection instead of letting the hosts checkpoint).
    "${detach[@]}" "${ssh_cmd[@]}" "${hosts[rank]}" "$remote" </dev/null > >(sed -u "s/^/[$rank] /") 2>&1 &
    pids+=($!)
done

rc=0
for rank in "${!pids[@]}"; do
    while kill -0 "${pids[rank]}" 2>/dev/null; do
        wait "${pids[rank]}" || true  # returns early whenever the trap runs
    done
    status=0
    wait "${pids[rank]}" || status=$?  # bash keeps the status of an exited background process
    if ((status != 0)); then
        echo "multinode.sh: ${hosts[rank]} (machine_rank $rank) exited $status" >&2
        rc=$status
    fi
done
rm -f "$STOP_FILE"
exit "$rc"
