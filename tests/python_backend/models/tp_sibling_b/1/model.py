"""Imports its sibling files as Triton models do (`import helper`, `from model_common import`,
a sub-package, `import model`, and a lazy import inside execute); MSG reports what it got, as
JSON, so two models with files of the same names can be told apart."""

import importlib
import json
import os
import sys

import helper
import numpy as np
import triton_python_backend_utils as pb_utils
from lib.tool import TOOL
from model_common import SHARED

VERSION_FOLDER_ON_PATH = os.path.dirname(os.path.abspath(__file__)) in sys.path
IMPORTED_BY_NAME = importlib.import_module("helper").NAME


class TritonPythonModel:
    def execute(self, requests):
        import lazy_helper
        import model

        report = {
            "helper": helper.NAME,
            "common": SHARED,
            "tool": TOOL,
            "lazy": lazy_helper.NAME,
            "model_is_this_module": model.TritonPythonModel is TritonPythonModel,
            "path_while_loading": VERSION_FOLDER_ON_PATH,
            "by_name": IMPORTED_BY_NAME,
            "path_now": os.path.dirname(os.path.abspath(__file__)) in sys.path,
        }
        blob = json.dumps(report).encode()
        return [
            pb_utils.InferenceResponse(
                [
                    pb_utils.Tensor(
                        "MSG", np.array([[blob]] * len(r.inputs()[0].as_numpy()), dtype=np.object_)
                    )
                ]
            )
            for r in requests
        ]
