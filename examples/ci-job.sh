#!/usr/bin/env bash
# ci-job.sh: run one CI job in a throwaway VM, with vmctl alone.
#
#   ci-job.sh NAME IMAGE PUBLIC-KEY PRIVATE-KEY COMMAND
#
# creates VM NAME from IMAGE with PUBLIC-KEY authorised (vmctl create
# --ssh-key --start), waits until its guest's SSH server answers, runs
# COMMAND in it over `vmctl ssh` with PRIVATE-KEY, prints the last lines of
# its console log, and destroys it, also when a step failed or the job was
# interrupted. The job's exit status is COMMAND's; or, when a vmctl step
# fails first, vmctl's: 1 (rejected, failed; also when its answer is not
# exactly one JSON document or not the result expected), 2 (usage), 3 (no
# result in time, no engine: worth a retry), 130 (interrupted); or 1 if
# COMMAND succeeded but the VM could not be destroyed.
#
# stdout carries COMMAND's output and nothing else; the script's own lines
# and the console log go to stderr.
#
# NAME belongs to the job: a VM of that name left behind by a job that was
# killed before its clean-up ran is destroyed first. A job may reuse a name
# as often as it likes: `vmctl ssh` pins the guest's host key (made at each
# boot) per incarnation of the VM, so a new VM under an old name is a new
# host, not a changed one.
#
# Every `vmctl --json` step must print exactly one JSON document on stdout
# (vmctl's contract: README "Scripting vmctl"), checked by a strict parser
# (python3's json module, refusing a second document, NaN and duplicate
# keys). `vmctl ssh` and `vmctl log` print the guest's output, text by
# nature, and take no --json.
#
# Environment: VMCTL (default vmctl), VMCTL_CREATE_FLAGS (more create flags,
# split on spaces, e.g. "--memory 256 --backend qemu"), BOOT_TIMEOUT (how
# long the guest has to answer on SSH, default 5m), LOG_LINES (default 50);
# vmctl's own: NATS_URL, NATS_CREDS, VMHERD_DATA_DIR, XDG_STATE_HOME.
# Needs bash 4.4 or later, python3 and the ssh client.
set -euo pipefail

VMCTL=${VMCTL:-vmctl}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-5m}
LOG_LINES=${LOG_LINES:-50}

if [[ $# -ne 5 ]]; then
  echo "usage: $0 NAME IMAGE PUBLIC-KEY PRIVATE-KEY COMMAND" >&2
  exit 2
fi
name=$1 image=$2 pubkey=$3 privkey=$4 command=$5
read -r -a create_flags <<<"${VMCTL_CREATE_FLAGS:-}"

work=$(mktemp -d "${TMPDIR:-/tmp}/ci-job.XXXXXX")

say() { echo "ci-job: $*" >&2; }

# fields FILE PATH...: checks that FILE holds exactly one JSON document and
# prints the value at each PATH (keys and list indexes joined by dots, such
# as commands.-1.result) followed by a NUL: a string as it is, anything
# else as JSON, a missing key as nothing.
fields() {
  python3 - "$@" <<'PY'
import json, sys

def no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError("duplicate key %r" % k)
        d[k] = v
    return d

def no_constant(c):
    raise ValueError("%s is not JSON" % c)

def at(d, path):
    for k in path.split("."):
        if isinstance(d, list):
            try:
                d = d[int(k)]
            except (ValueError, IndexError):
                return ""
        elif isinstance(d, dict) and k in d:
            d = d[k]
        else:
            return ""
    return d if isinstance(d, str) else json.dumps(d)

path = sys.argv[1]
try:
    with open(path, encoding="utf-8") as f:
        # One document and nothing after it but white space: json.load
        # raises "Extra data" on a second document or a trailing line.
        doc = json.load(f, object_pairs_hook=no_duplicates, parse_constant=no_constant)
except ValueError as e:
    sys.exit("ci-job: %s: not exactly one JSON document: %s" % (path, e))
for p in sys.argv[2:]:
    sys.stdout.write(at(doc, p) + "\0")
PY
}

# step NAME PATHS ARGS...: runs `vmctl --json ARGS...` with its stdout in
# $work/NAME.json, which must be exactly one JSON document, sets the array
# v to the values at PATHS (comma-separated, see fields) and returns
# vmctl's exit status.
step() {
  local out=$work/$1.json paths rc=0
  v=()
  IFS=, read -r -a paths <<<"$2"
  shift 2
  "$VMCTL" --json "$@" >"$out" || rc=$?
  if ! fields "$out" "${paths[@]}" >"$out.fields"; then
    say "vmctl --json $* (exit $rc) printed:"
    cat "$out" >&2
    return 1
  fi
  mapfile -d '' -t v <"$out.fields"
  return "$rc"
}

# fail STEP CODE WHY: says why, with the step's document, and exits CODE
# (vmctl's exit status, or 1).
fail() {
  say "$3"
  cat "$work/$1.json" >&2
  exit "$2"
}

# destroy STEP: destroys the VM, checking the result: destroyed, or
# nothing to destroy.
destroy() {
  local rc=0
  step "$1" commands.0.result,commands.0.skipped,error.message destroy "$name" --if-exists || rc=$?
  if [[ $rc -ne 0 ]]; then
    say "destroy $name: exit $rc${v[2]:+: ${v[2]}}"
    return 1
  fi
  if [[ -n ${v[1]:-} ]]; then
    say "destroy $name: nothing to do (${v[1]})"
  elif [[ ${v[0]:-} == destroyed ]]; then
    say "destroy $name: destroyed"
  else
    say "destroy $name: result ${v[0]:-none}, want destroyed"
    cat "$work/$1.json" >&2
    return 1
  fi
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if ! destroy destroy; then
    [[ $rc -ne 0 ]] || rc=1
  fi
  rm -rf "$work"
  exit "$rc"
}

trap 'rm -rf "$work"' EXIT
# A VM of this name left by a job killed before its clean-up ran.
destroy leftover
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rc=0
step create commands.0.result,commands.-1.result,record.host,error.message \
  create "$name" --image "$image" --ssh-key "$pubkey" --start "${create_flags[@]}" || rc=$?
if [[ $rc -ne 0 ]]; then
  fail create "$rc" "create $name: exit $rc: ${v[3]:-}"
fi
if [[ ${v[0]:-} != prepared || ${v[1]:-} != started ]]; then
  fail create 1 "create $name --start: results ${v[0]:-none}, ${v[1]:-none}; want prepared, started"
fi
say "created and started $name on host ${v[2]:-?}"

step wait banner,error.message wait "$name" --for ssh --timeout "$BOOT_TIMEOUT" || rc=$?
if [[ $rc -ne 0 ]]; then
  fail wait "$rc" "wait $name --for ssh: exit $rc: ${v[1]:-}"
fi
say "$name: SSH answers (${v[0]:-?})"

# BatchMode: fail rather than ask for a password or a passphrase.
rc=0
"$VMCTL" ssh "$name" -i "$privkey" -- -o BatchMode=yes "$command" </dev/null || rc=$?
say "command exited $rc"

say "console log of $name (last $LOG_LINES lines):"
"$VMCTL" log "$name" --tail "$LOG_LINES" >&2 || say "vmctl log $name failed (exit $?)"

exit "$rc"
