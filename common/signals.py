"""The signals that ask a job to stop (a scheduler's SIGTERM: time limit, preemption, a pod's stop; Ctrl-C's
SIGINT): the trainer turns them into a checkpoint and a stop, the launch supervisor passes them to the ranks,
and the loader's workers leave them to their main process."""

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
