# Sourced by tool/experiment.sh (train.sh, test.sh) and tool/gpu_check.sh; POSIX sh has no pipefail.
# logged FILE COMMAND...: run COMMAND with its stdout and stderr on the terminal and in FILE, after
# a `+ COMMAND` line saying what ran, and return COMMAND's exit status, not tee's. The status
# comes back through file descriptor 3, so no temporary file is needed. On Ctrl-C, tee (-i) and
# the shells here wait for COMMAND to finish, so its last words (`interrupted; ...`) reach both
# the terminal and FILE.
logged() {
  logged_file=$1
  shift
  trap : INT
  exec 4>&1
  logged_code=$({
    {
      trap : INT
      echo "+ $*"
      logged_code=0
      "$@" 2>&1 3>&- 4>&- || logged_code=$?
      echo "$logged_code" >&3
    } | tee -i "$logged_file" >&4 3>&-
  } 3>&1)
  exec 4>&-
  trap - INT
  return "$logged_code"
}
