"""The files and exit codes through which stages, the runner and SLURM job scripts talk. Plain
constants: importing this module imports no third-party package (a job script's shell and `t2i
status` read them without torch)."""

COMPLETE_MARKER = ".t2i-complete"  # in a stage's folder: the hash of the job that finished there
RUN_RECORD = ".t2i-run.json"  # in a stage's folder: the hash, result-changing keys and inputs of its job
LEGACY_STARTED_MARKER = ".t2i-started"  # written before run records existed: the hash of the job only
PREEMPTED_MARKER = "PREEMPTED"  # in a training stage's folder: checkpointed on a signal, run again to resume
ATTEMPTS_LOG = ".t2i-attempts.tsv"  # in a submitted stage's folder: job, restart, exit code, outcome of each attempt

class StageError(RuntimeError):
    """A failure whose message says all a user needs: `t2i` prints it without a traceback and exits 1."""


CONFIG_ERROR_EXIT_CODE = 2  # bad config or arguments, or a run the command refuses to touch
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on a signal; run the same command again to resume
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a Ctrl-C
