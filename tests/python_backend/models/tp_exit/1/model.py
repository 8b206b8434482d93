"""Tries to end its own process, as HOW says: os_exit, sigkill (os.kill of its pid), sigterm,
raise_signal (SIGKILL), abort, sys_exit, killpg; thread_exit: os._exit from a thread it starts
(joined); anything else: answers PID = its process id."""

import os
import signal
import sys
import threading

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        how = pb_utils.get_input_tensor_by_name(requests[0], "HOW").as_numpy()[0].decode()
        if how == "os_exit":
            os._exit(3)
        elif how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif how == "raise_signal":
            signal.raise_signal(signal.SIGKILL)
        elif how == "abort":
            os.abort()
        elif how == "sys_exit":
            sys.exit(4)
        elif how == "killpg":
            os.killpg(os.getpgrp(), signal.SIGKILL)
        elif how == "thread_exit":
            thread = threading.Thread(target=os._exit, args=(5,))
            thread.start()
            thread.join()
        pid = np.array([os.getpid()], dtype=np.int64)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("PID", pid)]) for _ in requests]
