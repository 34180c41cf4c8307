"""Drive a gateway with the unmodified ``tritonclient.grpc`` client (run as a child process).

tritonclient's generated protos and ours both define package ``inference``; protobuf refuses
duplicate symbols in one process, so tests run this script in a subprocess.

    python -m tests.support.triton_probe TARGET MODEL INPUTS.npz OUTPUTS.npz

Prints one JSON object: live, ready, metadata, and the response parameters (which node and
variant answered); writes the outputs to OUTPUTS.npz.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype


def main() -> int:
    target, model, inputs_path, outputs_path = sys.argv[1:5]
    client = tc.InferenceServerClient(url=target)
    report: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_model_ready(model),
    }
    try:  # an RPC of Triton's service that meshserve does not implement
        client.get_model_repository_index()
        report["repository_index"] = "OK"
    except InferenceServerException as exc:
        report["repository_index"] = str(exc.status())
    meta = client.get_model_metadata(model, as_json=True)
    report["metadata"] = meta
    arrays = dict(np.load(inputs_path))
    inputs = []
    for name, array in arrays.items():
        tensor = tc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [tc.InferRequestedOutput(o["name"]) for o in meta["outputs"]]
    result = client.infer(model, inputs, outputs=outputs, client_timeout=30)
    response = result.get_response(as_json=True)
    report["parameters"] = {
        k: v.get("string_param") for k, v in response.get("parameters", {}).items()
    }
    np.savez(outputs_path, **{o["name"]: result.as_numpy(o["name"]) for o in meta["outputs"]})
    print(json.dumps(report))
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
