#!/usr/bin/env bash
# One node's share of a multi-node run: `accelerate launch --machine_rank R ... -m train ... --resume auto`.
# launch/slurm.sh (through srun) and launch/multinode.sh (through ssh) run it once per node; you can also
# run it by hand on every node, from the repository root. Settings come from the environment:
#
#   MACHINE_RANK   this node's rank, 0 on the node at MAIN_ADDR          default: $SLURM_NODEID
#   NNODES         number of nodes                                       default: $SLURM_NNODES, else 1
#   NGPU           training processes (GPUs) per node                    default: $SLURM_GPUS_ON_NODE, else
#                                                                        the GPUs nvidia-smi lists
#   MAIN_ADDR      host name or address of the node of rank 0            required when NNODES > 1
#   PORT           rendezvous port on MAIN_ADDR                          default: 29500
#   JOIN_TIMEOUT   seconds every node waits for the others to join       default: 600
#   CONFIG         accelerate config                                     default: launch/multinode_ddp.yaml
#   PRESET DATA OUT   --preset, --data, --out of the run                 default: paper, data/enwik8,
#                                                                        runs/$PRESET
#   STOP_FILE      watched by the node of rank 0: when this file appears, SIGTERM goes to that node's
#                  training processes (not to the launcher). The trainer reduces its stop flag over all
#                  ranks, so every rank finishes the same step, checkpoints and exits 0. (Signalling every
#                  node instead would race: a late SIGTERM can reach a rank that is already exiting, when
#                  Python no longer handles it, and that rank would die with -15.)
#   ACCELERATE     the accelerate executable                             default: accelerate
#   POLL_S         seconds between looks at STOP_FILE                    default: 2
#   DRY_RUN=1      print the accelerate launch command instead of running it
#
# Arguments are passed on to `-m train`, after the ones above. SIGTERM to this script does what STOP_FILE
# does. The exit status is accelerate launch's.
set -euo pipefail

MACHINE_RANK=${MACHINE_RANK:-${SLURM_NODEID:-}}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
PORT=${PORT:-29500}
JOIN_TIMEOUT=${JOIN_TIMEOUT:-600}
CONFIG=${CONFIG:-launch/multinode_ddp.yaml}
PRESET=${PRESET:-paper}
DATA=${DATA:-data/enwik8}
OUT=${OUT:-runs/$PRESET}
ACCELERATE=${ACCELERATE:-accelerate}
POLL_S=${POLL_S:-2}
NODE=${SLURMD_NODENAME:-${HOSTNAME:-$(uname -n)}}

die() { echo "node.sh: error: $*" >&2; exit 2; }

if [[ -z ${NGPU:-} ]]; then
    NGPU=${SLURM_GPUS_ON_NODE:-}
    if [[ -z $NGPU ]] && command -v nvidia-smi >/dev/null 2>&1; then
        NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
fi
[[ ${NGPU:-} =~ ^[1-9][0-9]*$ ]] || die "set NGPU to the number of training processes (GPUs) per node"
[[ $MACHINE_RANK =~ ^[0-9]+$ ]] || die "set MACHINE_RANK (0 on the main node, 1..NNODES-1 on the others)"
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
((MACHINE_RANK < NNODES)) || die "MACHINE_RANK=$MACHINE_RANK but NNODES=$NNODES: ranks are 0..$((NNODES - 1))"
if ((NNODES > 1)) && [[ -z ${MAIN_ADDR:-} ]]; then
    die "set MAIN_ADDR to the host name or address of the node of machine rank 0"
fi
[[ -f $CONFIG ]] || die "no accelerate config $CONFIG (run from the repository root, or set CONFIG)"

cmd=("$ACCELERATE" launch --config_file "$CONFIG" --num_machines "$NNODES"
     --num_processes "$((NNODES * NGPU))" --machine_rank "$MACHINE_RANK")
if [[ -n ${MAIN_ADDR:-} ]]; then
    cmd+=(--main_process_ip "$MAIN_ADDR")
fi
# --rdzv_conf timeout: how long the node of rank 0 waits for the others to join (and they to reach it)
# before the launcher fails with 'waiting for clients' / 'timed out ... trying to connect'.
cmd+=(--main_process_port "$PORT" --rdzv_conf "timeout=$JOIN_TIMEOUT"
      -m train --preset "$PRESET" --data "$DATA" --out "$OUT" --resume auto "$@")

line=$(printf '%q ' "${cmd[@]}")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    # One write, so that the lines of nodes printing at once do not interleave.
    printf '# machine_rank %s of %s on %s\n%s\n' "$MACHINE_RANK" "$NNODES" "$NODE" "${line% }"
    exit 0
fi

launcher=""
stopping=0
stop_training() {
    # The launcher is left alone: when it receives SIGTERM itself it kills the workers after 30 s and exits
    # 1 even if they stopped cleanly. Its direct children are the training processes.
    [[ -n $launcher ]] || exit 143  # nothing started yet: nothing to save
    [[ $stopping == 0 ]] || return 0
    stopping=1
    echo "node.sh: machine_rank $MACHINE_RANK: SIGTERM to the training processes (checkpoint, then exit)" >&2
    pkill -TERM -P "$launcher" || true
}
trap stop_training TERM

echo "node.sh: machine_rank $MACHINE_RANK of $NNODES on $NODE: ${line% }"
"${cmd[@]}" &
launcher=$!

while kill -0 "$launcher" 2>/dev/null; do
    if ((MACHINE_RANK == 0)) && [[ -n ${STOP_FILE:-} && -e $STOP_FILE ]]; then
        stop_training
    fi
    sleep "$POLL_S" &
    wait $! || true  # returns early when a trapped signal arrives
done
rc=0
wait "$launcher" || rc=$?
if ((rc != 0)); then
    cat >&2 <<EOF
node.sh: machine_rank $MACHINE_RANK on $NODE: accelerate launch exited $rc.
  'waiting for clients' / 'timed out ... trying to connect' above: not every node joined within
      JOIN_TIMEOUT=${JOIN_TIMEOUT}s. Did all $NNODES nodes start, and can each reach
      ${MAIN_ADDR:-this node}:$PORT?
  'Connection closed by peer' / a collective timing out: a rank on another node failed first; its log
      names the cause.
EOF
fi
exit "$rc"
