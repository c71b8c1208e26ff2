# Sourced by tool/train.sh and tool/test.sh (POSIX sh has no pipefail).
# logged FILE COMMAND...: run COMMAND with its stdout and stderr on the terminal and in FILE, and
# return COMMAND's exit status, not tee's.
logged() {
  logged_file=$1
  shift
  logged_status=$(mktemp)
  { logged_code=0; "$@" 2>&1 || logged_code=$?; echo "$logged_code" > "$logged_status"; } | tee "$logged_file"
  logged_code=$(cat "$logged_status")
  rm -f "$logged_status"
  return "$logged_code"
}
