#!/usr/bin/env bash
# SHA-RNN on several nodes under SLURM: one `accelerate launch` per node (launch/node.sh through srun),
# machine rank = SLURM_NODEID, rendezvous at the first node of the allocation. Submit from the repository
# root, which (with DATA and OUT) must be on a filesystem that every node sees:
#
#   sbatch launch/slurm.sh                                       # 4 nodes x 8 GPUs, the paper preset, DDP
#   sbatch --nodes 2 launch/slurm.sh --lr_scaling sqrt           # arguments go to `-m train`
#   CONFIG=launch/multinode_deepspeed.yaml sbatch launch/slurm.sh --precision fp16
#   DRY_RUN=1 sbatch launch/slurm.sh                             # every node prints its command, runs nothing
#
# Environment (sbatch passes yours on): PRESET [paper], DATA [data/enwik8], OUT [runs/$PRESET],
# CONFIG [launch/multinode_ddp.yaml], NGPU [$SLURM_GPUS_ON_NODE], PORT [29500 + job id mod 1000],
# MAIN_ADDR [first host], JOIN_TIMEOUT [600 s for all nodes to join], REQUEUE [1], DRY_RUN [0].
#
# Runs are started with --resume auto, so a requeued job continues from its latest checkpoint.
# Preemption and the time limit: --signal=B:TERM@120 gives this script SIGTERM 120 s before the end. It then
# creates $OUT/.stop-<job id>; node.sh on the node of rank 0 sees it and sends SIGTERM to its training
# processes; the trainer stops every rank at the same step, writes a checkpoint and exits 0 (the launchers
# then exit 0 too); this script requeues the job (scontrol requeue) unless the run had finished. When SLURM
# instead signals every process at once (scancel, preemption without this head start), the launchers get
# SIGTERM too: they give the training processes 30 s to checkpoint, then kill them, and exit 1; --resume auto
# still continues from the latest complete checkpoint. See the README, "Scaling out".
#
#SBATCH --job-name=sharnn
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

die() { echo "slurm.sh: error: $*" >&2; exit 2; }

[[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]] ||
    die "not inside a SLURM job: submit it with 'sbatch launch/slurm.sh' (DRY_RUN=1 to print the commands)"
cd "${REPO:-${SLURM_SUBMIT_DIR:-.}}"
[[ -f launch/node.sh ]] || die "run from the repository root (or set REPO): no launch/node.sh in $PWD"

export NNODES=${SLURM_NNODES:?}
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
((${#hosts[@]} == NNODES)) ||
    die "scontrol lists ${#hosts[@]} hosts for $SLURM_JOB_NODELIST, SLURM_NNODES=$NNODES"
export MAIN_ADDR=${MAIN_ADDR:-${hosts[0]}}
if [[ -z ${NGPU:-} ]]; then
    NGPU=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
    NGPU=${NGPU##*:}  # --gpus-per-node=a100:8 -> 8
fi
[[ ${NGPU:-} =~ ^[1-9][0-9]*$ ]] || die "set NGPU (GPUs per node): SLURM_GPUS_ON_NODE is not set"
export NGPU
export PORT=${PORT:-$((29500 + SLURM_JOB_ID % 1000))}  # two jobs sharing a node do not collide
export PRESET=${PRESET:-paper}
export DATA=${DATA:-data/enwik8}
export OUT=${OUT:-runs/$PRESET}
export CONFIG=${CONFIG:-launch/multinode_ddp.yaml}
export JOIN_TIMEOUT=${JOIN_TIMEOUT:-600}
export DRY_RUN=${DRY_RUN:-0}
export STOP_FILE=$OUT/.stop-$SLURM_JOB_ID

echo "slurm.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES nodes x $NGPU GPUs," \
     "rendezvous $MAIN_ADDR:$PORT, $CONFIG, --preset $PRESET --out $OUT"
unset MACHINE_RANK  # each task's own SLURM_NODEID
# A step gets only the CPUs it asks for (Slurm >= 20.11): all of the node's, for the data loaders and workers.
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
srun_cmd=(srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$cpus" --kill-on-bad-exit=1
          bash launch/node.sh "$@")
if [[ $DRY_RUN == 1 ]]; then
    printf '# %s\n' "$(printf '%q ' "${srun_cmd[@]}")"
    exec "${srun_cmd[@]}"
fi
mkdir -p "$OUT"
rm -f "$STOP_FILE"

stop_requested=0
# shellcheck disable=SC2317  # called by the trap
on_term() {
    stop_requested=1
    echo "slurm.sh: SIGTERM (time limit or preemption): every rank checkpoints and exits"
    touch "$STOP_FILE" || echo "slurm.sh: cannot create $STOP_FILE: the run is not stopped" >&2
}
trap on_term TERM

"${srun_cmd[@]}" &
step=$!
while kill -0 "$step" 2>/dev/null; do
    wait "$step" || true  # returns early whenever the trap runs
done
rc=0
wait "$step" || rc=$?  # bash keeps the status of an exited background process
rm -f "$STOP_FILE"

if ((stop_requested)); then
    if grep -qs '"exit": "finished"' "$OUT/summary.json"; then
        echo "slurm.sh: the run had finished; not requeued"
    elif [[ ${REQUEUE:-1} == 1 ]]; then
        ((rc == 0)) || echo "slurm.sh: srun exited $rc while stopping; the requeued job continues" \
            "from the latest complete checkpoint"
        echo "slurm.sh: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" ||
            echo "slurm.sh: scontrol requeue failed: resubmit with the same OUT to continue"
        exit 0
    fi
fi
exit "$rc"
