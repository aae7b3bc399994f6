"""Run with the SGLang server venv's Python: do SGLang's own request types accept these bodies?

Reads ``{"generate": [...], "load": [...], "unload": [...]}`` (JSON) from the file named by the
first argument and parses each body the way SGLang 0.5.23's HTTP server does: the ``/generate``
JSON contract gate, then ``GenerateReqInput`` (pydantic) with ``normalize_batch_and_arguments``
and ``SamplingParams.verify``; ``LoadLoRAAdapterReqInput`` and ``UnloadLoRAAdapterReqInput``
(pydantic over msgspec). SGLang ignores unknown top-level keys silently, so every key must also
be a field of the request type (a misspelt ``lora_path`` would otherwise be dropped). Prints one
JSON line per body: ``{"kind", "index", "ok", "error"}``.
"""

import dataclasses
import json
import sys

import pydantic

from sglang.srt.entrypoints.api_contract import generate_contract_error
from sglang.srt.managers.io_struct import (
    GenerateReqInput,
    LoadLoRAAdapterReqInput,
    UnloadLoRAAdapterReqInput,
)
from sglang.srt.sampling.sampling_params import SamplingParams

VOCAB_SIZE = 32


def check_generate(body: dict) -> None:
    unknown = set(body) - {field.name for field in dataclasses.fields(GenerateReqInput)}
    if unknown:
        raise ValueError(f"GenerateReqInput has no fields {sorted(unknown)}")
    error = generate_contract_error(body)
    if error is not None:
        raise ValueError(error)
    request = pydantic.TypeAdapter(GenerateReqInput).validate_python(body)
    request.normalize_batch_and_arguments()
    named = request.lora_path if isinstance(request.lora_path, list) else [request.lora_path]
    if not named or any(name != body["lora_path"] for name in named):
        raise ValueError(f"lora_path {body['lora_path']!r} became {request.lora_path!r}")
    params = request.sampling_params
    for one in params if isinstance(params, list) else [params]:
        SamplingParams(**one).verify(VOCAB_SIZE)


def check_struct(kind, body: dict) -> None:
    unknown = set(body) - set(kind.__struct_fields__)
    if unknown:
        raise ValueError(f"{kind.__name__} has no fields {sorted(unknown)}")
    pydantic.TypeAdapter(kind).validate_python(body)


def main() -> None:
    with open(sys.argv[1]) as handle:
        bodies = json.load(handle)
    checks = {
        "generate": check_generate,
        "load": lambda body: check_struct(LoadLoRAAdapterReqInput, body),
        "unload": lambda body: check_struct(UnloadLoRAAdapterReqInput, body),
    }
    for kind, check in checks.items():
        for index, body in enumerate(bodies.get(kind, [])):
            try:
                check(body)
                print(json.dumps({"kind": kind, "index": index, "ok": True, "error": ""}))
            except Exception as exc:  # report every refusal, not only the first
                print(json.dumps({"kind": kind, "index": index, "ok": False,
                                  "error": f"{type(exc).__name__}: {exc}"[:3000]}))


if __name__ == "__main__":
    main()
