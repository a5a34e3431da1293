"""ONNX Runtime draft path: export a draft network with static shapes, run it on an execution
provider (NPU / GPU / CPU) as a drop-in `DraftNet`.

    mirror export-draft --draft self --draft-layers 4 --out drafts/self4
    net = OrtDraftNet("drafts/self4", providers=["QNNExecutionProvider", "CPUExecutionProvider"])

Needs the `onnx` extra (onnxruntime, onnx, onnxscript); nothing here is imported by the rest
of the package unless the ONNX backend is asked for.
"""
_EXPORTS = {"OrtDraftNet": "runtime", "export_draft": "export", "export_from_spec": "export",
            "read_metadata": "export", "parse_providers": "providers",
            "ProviderFallbackError": "providers", "ProviderFallbackWarning": "providers"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):  # lazy: SpecConfig validation imports providers without the runtime
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
