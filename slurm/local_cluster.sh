#!/usr/bin/env bash
# A real, throw-away SLURM cluster on this machine, for the tests and for trying the sbatch scripts locally.
#
#   eval "$(slurm/local_cluster.sh start [DIR])"   # prints `export SLURM_CONF=DIR/slurm.conf`; DIR defaults to a new temp dir
#   slurm/local_cluster.sh status [DIR]            # sinfo + squeue
#   slurm/local_cluster.sh stop [DIR]              # stops exactly the daemons `start` wrote pid files for
#
# DIR may be left out after the `eval`: it is then the folder of $SLURM_CONF. Everything (munge key and socket,
# slurm.conf, state, spool, logs, pid files) lives under DIR; nothing in /etc is touched. TUNELOOP_SLURM_NODES
# (default 2) slurmd daemons on this one host emulate that many nodes, n1..nN (Debian's slurmd is built with
# multiple-slurmd support), so multi-node jobs really get SLURM_NNODES > 1 and one task per node. The node names do
# not resolve as host names; their NodeAddr is 127.0.0.1 (what the multi-node script reads). Needs root: slurm-wlm
# and munge are installed with apt-get when missing, and the daemons run as root (SlurmUser=root).
set -euo pipefail

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

nodes=${TUNELOOP_SLURM_NODES:-2}

install_if_missing() {
  local missing=0 tool
  for tool in munged mungekey slurmctld slurmd sbatch scontrol sinfo; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || missing=1
  done
  [ "$missing" = 0 ] && return
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and installing them needs root: apt-get install slurm-wlm munge"
  say "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq slurm-wlm munge; } >&2 || die "apt-get install slurm-wlm munge failed"
}

# A port nobody listens on: SLURM's defaults (6817/6818) may be taken by another cluster on the same machine.
free_port() {
  local port
  for _ in $(seq 100); do
    port=$((20000 + RANDOM % 30000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return; fi
  done
  die "no free port found"
}

write_conf() {
  local dir=$1 ctld_port slurmd_port cpus
  ctld_port=$(free_port)
  slurmd_port=$(free_port)  # node i listens on slurmd_port + i - 1
  cpus=$(nproc)
  cat >"$dir/slurm.conf" <<EOF
# Written by slurm/local_cluster.sh: a $nodes-node cluster emulated by $nodes slurmd on localhost.
ClusterName=tuneloop-local
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A private munged (the socket's folder must be mode 711); short credential life so a requeued job restarts in seconds.
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=5
MpiDefault=none
MailProg=/bin/true
# No cgroups here: process groups track job processes (proctrack/linuxproc left orphans when it was tried).
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Schedule every second or two, not every minute: jobs (and requeued jobs) start at once.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to \`scontrol show job\` for 5 minutes (there is no accounting database for sacct).
MinJobAge=300
KillWait=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
NodeName=n[1-$nodes] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$slurmd_port-$((slurmd_port + nodes - 1))] CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  local dir=${1:-}
  install_if_missing
  [ -n "$dir" ] || dir=$(mktemp -d /tmp/tuneloop-slurm.XXXXXX)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ ! -e "$dir/run/slurmctld.pid" ] || die "$dir already holds a cluster: slurm/local_cluster.sh stop $dir"
  # munged refuses a socket that not everyone can reach: every folder above it must be searchable by all (o+x).
  chmod 711 "$dir"
  local up=$dir
  while [ "$up" != / ]; do
    up=$(dirname "$up")
    [ "$(( 0$(stat -c %a "$up") & 1 ))" = 1 ] || die "$up is not searchable by all (mode $(stat -c %a "$up")), which munged requires of every folder above its socket: pick a DIR elsewhere, e.g. under /tmp"
  done
  mkdir -p "$dir"/{munge,state,run,log} && chmod 711 "$dir/munge"
  for i in $(seq "$nodes"); do mkdir -p "$dir/spool/n$i"; done
  export SLURM_CONF=$dir/slurm.conf
  write_conf "$dir"
  trap 'stop "$dir"' EXIT # a daemon that fails to start stops the ones started before it

  mungekey -c -k "$dir/munge/munge.key" -b 1024 && chmod 600 "$dir/munge/munge.key"
  /usr/sbin/munged --socket="$dir/munge/munge.socket.2" --key-file="$dir/munge/munge.key" \
    --log-file="$dir/log/munged.log" --pid-file="$dir/run/munged.pid" --seed-file="$dir/munge/munge.seed" \
    </dev/null >>"$dir/log/munged.log" 2>&1 || die "munged did not start: $dir/log/munged.log"
  # The daemons fork into the background and write their pid files; their stdio must not hold the caller's pipes.
  /usr/sbin/slurmctld -f "$SLURM_CONF" </dev/null >>"$dir/log/slurmctld.log" 2>&1 || die "slurmctld did not start: $dir/log/slurmctld.log"
  for i in $(seq "$nodes"); do
    /usr/sbin/slurmd -f "$SLURM_CONF" -N "n$i" </dev/null >>"$dir/log/slurmd-n$i.log" 2>&1 || die "slurmd n$i did not start: $dir/log/slurmd-n$i.log"
  done

  local states=""
  for _ in $(seq 60); do
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [ "$(grep -o ' idle ' <<<" $states" | wc -l)" = "$nodes" ]; then
      say "$nodes node(s) idle: $states(all files in $dir)"
      trap - EXIT
      echo "export SLURM_CONF=$SLURM_CONF"
      return
    fi
    sleep 0.5
  done
  say "nodes not idle after 30 s: ${states:-no answer from slurmctld}; logs in $dir/log"
  exit 1
}

cluster_dir() {
  local dir=${1:-}
  if [ -z "$dir" ] && [ -n "${SLURM_CONF:-}" ]; then dir=$(dirname "$SLURM_CONF"); fi
  [ -n "$dir" ] || die "give the cluster's DIR (or set SLURM_CONF)"
  [ -f "$dir/slurm.conf" ] || die "$dir has no slurm.conf written by this script"
  echo "$dir"
}

stop() {
  local dir pidfile pid stopped=""
  dir=$(cluster_dir "${1:-}")
  export SLURM_CONF=$dir/slurm.conf
  # Jobs first: a stopped slurmd leaves its job steps running. Cancel them and give them KillWait to end.
  if [ -f "$dir/run/slurmctld.pid" ] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
    local jobs
    mapfile -t jobs < <(squeue -h -o %i 2>/dev/null || true)
    if [ "${#jobs[@]}" -gt 0 ]; then
      say "cancelling jobs: ${jobs[*]}"
      scancel "${jobs[@]}" 2>/dev/null || true
      for _ in $(seq 40); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  # slurmd first (they end their job steps), then slurmctld, then munged, which the others need until they exit.
  for pidfile in "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid" "$dir/run/munged.pid"; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then say "$(basename "$pidfile" .pid) ($pid) ignored SIGTERM for 10 s: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
      stopped+="$(basename "$pidfile" .pid) "
    fi
    rm -f "$pidfile"
  done
  say "stopped ${stopped:-nothing (no daemon was running)}; logs kept in $dir/log"
}

status() {
  local dir
  dir=$(cluster_dir "${1:-}")
  export SLURM_CONF=$dir/slurm.conf
  sinfo -N
  squeue
}

case "${1:-}" in
  start | stop | status) "$@" ;;
  *) echo "usage: $0 start [DIR] | stop [DIR] | status [DIR]" >&2; exit 2 ;;
esac
