"""ONNX Runtime draft path: export a draft network with static shapes, run it on an execution
provider (NPU / GPU / CPU) as a drop-in `DraftNet`.

    mirror export-draft --draft self --draft-layers 4 --out drafts/self4
    net = OrtDraftNet("drafts/self4", providers=["QNNExecutionProvider", "CPUExecutionProvider"])

Needs the `onnx` extra (onnxruntime, onnx, onnxscript); nothing here is imported by the rest
of the package unless the ONNX backend is asked for.
"""
from .export import export_draft, export_from_spec, read_metadata
from .providers import ProviderFallbackError, ProviderFallbackWarning, parse_providers
from .runtime import OrtDraftNet

__all__ = ["OrtDraftNet", "ProviderFallbackError", "ProviderFallbackWarning", "export_draft",
           "export_from_spec", "parse_providers", "read_metadata"]
