"""Drive a gateway with the unmodified ``tritonclient.grpc`` client (run as a child process).

tritonclient's generated protos and ours both define package ``inference``; protobuf refuses
duplicate symbols in one process, so tests run this script in a subprocess.

    python -m tests.support.triton_probe TARGET MODEL INPUTS.npz OUTPUTS.npz
    python -m tests.support.triton_probe --stream TARGET MODEL INPUTS.npz OUTPUTS.npz

With ``--stream``, each row of the first input is sent as its own request over tritonclient's
bidirectional streaming API (``ModelStreamInfer``) with id ``row-<i>``; the report lists the ids
in the order the answers arrived, and OUTPUTS.npz holds each answer under ``<id>/<output>``.

Prints one JSON object: live, ready, metadata, and the response parameters (which node and
variant answered); writes the outputs to OUTPUTS.npz.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype


def stream(target: str, model: str, inputs_path: str, outputs_path: str) -> int:
    import queue
    from functools import partial

    client = tc.InferenceServerClient(url=target)
    arrays = dict(np.load(inputs_path))
    answers: queue.Queue[tuple[object, object]] = queue.Queue()

    def callback(out: queue.Queue[tuple[object, object]], result: object, error: object) -> None:
        out.put((result, error))

    client.start_stream(callback=partial(callback, answers))
    rows = len(next(iter(arrays.values())))
    for i in range(rows):
        inputs = []
        for name, array in arrays.items():
            tensor = tc.InferInput(name, [1, *array.shape[1:]], np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array[i : i + 1])
            inputs.append(tensor)
        client.async_stream_infer(model, inputs, request_id=f"row-{i}")
    order, errors, saved = [], [], {}
    for _ in range(rows):
        result, error = answers.get(timeout=30)
        if error is not None:
            errors.append(str(error))
            continue
        response = result.get_response()  # type: ignore[attr-defined]
        order.append(response.id)
        for output in response.outputs:
            saved[f"{response.id}/{output.name}"] = result.as_numpy(output.name)  # type: ignore[attr-defined]
    client.stop_stream()
    client.close()
    np.savez(outputs_path, **saved)
    print(json.dumps({"order": order, "errors": errors}))
    return 0


def main() -> int:
    if sys.argv[1] == "--stream":
        return stream(*sys.argv[2:6])
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
