"""Triton python-backend models (`class TritonPythonModel` + `triton_python_backend_utils`) on Convoy.

`pb_utils` is the module model code imports as `triton_python_backend_utils` (Convoy registers
it under that name before it imports a model.py; nothing named so is installed); `adapter`
runs a `TritonPythonModel` as one instance of Convoy's python backend.
"""
