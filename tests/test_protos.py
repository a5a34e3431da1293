"""The committed gRPC code in mirror/proto/ is what scripts/gen_protos.sh makes from protos/."""
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_matches_protos(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the test extra")
    out = tmp_path / "proto"
    r = subprocess.run(["bash", str(ROOT / "scripts/gen_protos.sh"), str(out)], capture_output=True,
                       text=True, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    committed = ROOT / "mirror/proto"
    assert _files(out) == _files(committed), "generated file set differs: run scripts/gen_protos.sh"
    stale = [f for f in sorted(_files(out)) if not filecmp.cmp(out / f, committed / f, shallow=False)]
    assert not stale, f"mirror/proto is out of date with protos/ ({', '.join(stale)}): run scripts/gen_protos.sh"


def test_generated_modules_import():
    from mirror.proto.mirror.v1 import channel_pb2, channel_pb2_grpc, generate_pb2, generate_pb2_grpc

    assert generate_pb2.DESCRIPTOR.services_by_name["Generate"].full_name == "mirror.v1.Generate"
    assert channel_pb2.DESCRIPTOR.services_by_name["DraftChannel"].full_name == "mirror.v1.DraftChannel"
    assert hasattr(generate_pb2_grpc, "GenerateStub") and hasattr(channel_pb2_grpc, "DraftChannelStub")
