# Sourced by tool/experiment.sh (train.sh, test.sh) and tool/gpu_check.sh; POSIX sh has no pipefail.
# logged FILE COMMAND...: run COMMAND with its stdout and stderr on the terminal and in FILE, after
# a `+ COMMAND` line saying what ran, and return COMMAND's exit status, not tee's.
logged() {
  logged_file=$1
  shift
  logged_status=$(mktemp)
  {
    echo "+ $*"
    logged_code=0
    "$@" 2>&1 || logged_code=$?
    echo "$logged_code" > "$logged_status"
  } | tee "$logged_file"
  logged_code=$(cat "$logged_status")
  rm -f "$logged_status"
  return "$logged_code"
}
