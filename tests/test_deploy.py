"""Every YAML in deploy/ loads and validates, and the cluster manifests agree with the configs
they run."""
from pathlib import Path

import pytest
import yaml

from mirror.runtime.config import DEFAULT_DRAFT_RESOURCE, DeploymentConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ALL_YAML = sorted(DEPLOY.rglob("*.yaml"))
MANIFESTS = {"cluster.yaml", "raycluster.yaml", "rayjob.yaml"}
CONFIGS = [p for p in ALL_YAML if p.name not in MANIFESTS]


def test_deploy_folder_has_the_expected_files():
    names = {p.name for p in ALL_YAML}
    assert {"local.yaml", "single_node_two_device.yaml", "multi_node.yaml"} <= names
    assert MANIFESTS <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_mirror_configs_validate(path):
    cfg = DeploymentConfig.load(str(path))
    assert cfg.draft.resource != "NPU"
    cfg.speculative.resolve_exit_layer(30)


def test_local_is_the_embedded_default():
    cfg = DeploymentConfig.load(str(DEPLOY / "local.yaml"))
    assert cfg.ray.address is None and cfg.model is None
    assert cfg.target.cpu_affinity != cfg.draft.cpu_affinity  # separate cores
    assert cfg.server.host == "127.0.0.1"


def test_bad_configs_are_rejected(tmp_path):
    bad = {
        "unknown top-level key": {"modle": "x"},
        "unknown draft key": {"draft": {"backnd": "onnx"}},
        "Ray's NPU resource": {"draft": {"resource": "NPU"}},
        "bad provider": {"draft": {"providers": ["MagicExecutionProvider"]}},
        "bad placement": {"placement": "EVERYWHERE"},
        "bad speculative": {"speculative": {"gamma": 0}},
        "bundled artifacts on another model": {"model": "other.gguf", "speculative": {"exit_head": "bundled"}},
        "unknown target backend": {"target": {"backend": "tpu"}},
        "onnx target over two workers": {"target": {"backend": "onnx", "num_workers": 2}},
        "onnx target in bf16": {"dtype": "bf16", "target": {"backend": "onnx"}},
        "colocated draft beside two target workers": {"draft": {"colocate": True}, "target": {"num_workers": 2}},
        "prefill cores not a list": {"target": {"prefill_cores": 1}},
        "no prefill cores": {"target": {"prefill_cores": []}},
        "a negative prefill core": {"target": {"prefill_cores": [0, -1]}},
        "unknown prefill attention": {"target": {"prefill_attention": "flash"}},
    }
    for name, d in bad.items():
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(d))
        with pytest.raises(ValueError):
            DeploymentConfig.load(str(p))


def test_target_backend_auto_resolves_to_onnx_only_where_it_applies(monkeypatch):
    from mirror.models import ort_target
    from mirror.runtime.config import TargetConfig

    assert DeploymentConfig.local().target.backend == "auto"
    monkeypatch.setattr(ort_target, "available", lambda: True)
    assert TargetConfig().resolve_backend("fp32") == "onnx"
    assert TargetConfig().resolve_backend("bf16") == "torch"
    assert TargetConfig(num_workers=2).resolve_backend("fp32") == "torch"  # tensor parallel
    assert TargetConfig(device="cuda", num_gpus=1).resolve_backend("fp32") == "torch"
    assert TargetConfig(backend="torch").resolve_backend("fp32") == "torch"
    monkeypatch.setattr(ort_target, "available", lambda: False)  # no onnx extra installed
    assert TargetConfig().resolve_backend("fp32") == "torch"
    assert TargetConfig(backend="onnx").resolve_backend("fp32") == "onnx"  # explicit: the build says why


def test_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    c = prepare_config(yaml.safe_load((DEPLOY / "cluster.yaml").read_text()))
    validate_config(c)
    multi = DeploymentConfig.load(str(DEPLOY / "multi_node.yaml"))
    res = {r for t in c["available_node_types"].values() for r in t["resources"]}
    assert multi.draft.resource in res and multi.target.resource in res
    gpu_nodes = sum(t["min_workers"] for t in c["available_node_types"].values() if t["resources"].get("GPU"))
    assert gpu_nodes >= multi.target.num_workers


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_match_the_multi_node_config(name):
    doc = yaml.safe_load((DEPLOY / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    multi = DeploymentConfig.load(str(DEPLOY / "multi_node.yaml"))
    declared = " ".join(g["rayStartParams"].get("resources", "") for g in groups.values())
    assert multi.draft.resource in declared and multi.target.resource in declared
    if doc["kind"] == "RayJob":
        entry = doc["spec"]["entrypoint"].split()
        cfg = entry[entry.index("--config") + 1]
        assert entry[:3] == ["python", "-m", "mirror.serve"]
        DeploymentConfig.load(str(DEPLOY.parent / cfg))


def test_default_draft_resource_is_not_rays_npu():
    assert DEFAULT_DRAFT_RESOURCE != "NPU"


def test_local_yaml_equals_the_built_in_embedded_default():
    """`mirror generate` without --config uses DeploymentConfig.local(); keep it = deploy/local.yaml."""
    assert DeploymentConfig.load(str(DEPLOY / "local.yaml")).to_dict() == DeploymentConfig.local().to_dict()


def test_another_model_drops_the_defaults_bundled_artifacts():
    local = DeploymentConfig.local()
    assert local.speculative.exit_head == "bundled" and local.speculative.ngram_datastore == "bundled"
    other = local.with_model("other.gguf")
    assert other.model == "other.gguf"
    assert other.speculative.exit_head is None and other.speculative.ngram_datastore is None
    assert other.speculative.exit_trim is None and other.speculative.method == local.speculative.method
    assert local.speculative.exit_quant == "int8" and other.speculative.exit_quant == "none"
    # the default's combined draft drafts with the model's own GGUF blocks: kept for a GGUF file,
    # dropped (the n-gram alone) for a Hugging Face folder
    assert local.speculative.draft == "ngram+model" and local.speculative.draft_quant == "gguf"
    assert (other.speculative.draft, other.speculative.draft_quant) == ("ngram+model", "gguf")
    hf = local.with_model("some/hf_folder").speculative
    assert (hf.draft, hf.draft_model, hf.draft_quant) == ("ngram", None, "none") and hf.gamma == local.speculative.gamma


def test_bundled_artifacts_exist_and_load(bundled):
    from mirror.decoding.drafters.ngram import load_datastore
    from mirror.decoding.drafters.vocab_trim import VocabTrim
    from mirror.decoding.factory import load_exit_head
    from mirror.models.bundled import resolve_artifact

    spec = DeploymentConfig.local().speculative
    head = load_exit_head(spec, bundled.model)  # checks the model fingerprint
    assert head is not None
    trim = VocabTrim.load(resolve_artifact("bundled", "vocab_trim"))
    assert 0 < len(trim.keep_ids) < bundled.model.cfg.vocab_size
    assert len(load_datastore(spec.ngram_datastore).table) > 1000


def test_draft_onnx_max_len_reaches_the_draft_workers_spec(tmp_path, monkeypatch):
    """draft.onnx_max_len (deployment) is what the draft worker exports with: the token channel
    does not carry it, so `--onnx-max-len` on the CLI maps there too; bad values are refused."""
    from mirror import cli
    from mirror.runtime.workers import draft_placement
    from mirror.spec_config import SpecConfig

    p = tmp_path / "d.yaml"
    p.write_text(yaml.safe_dump({"draft": {"backend": "onnx", "onnx_max_len": 1024}}))
    deploy = DeploymentConfig.load(str(p))
    assert deploy.draft.onnx_max_len == 1024
    for d, want in ((deploy, 1024), (DeploymentConfig.local(), 4096)):  # unset: the spec's own
        spec = draft_placement(d.draft, SpecConfig(method="sd", draft="ngram", onnx_max_len=4096))
        assert spec.draft_backend == "onnx" and spec.onnx_max_len == want
    seen, real = [], cli.deployment_from_args

    def stop(args):  # the deployment `mirror generate` would start, then stop before Ray
        seen.append(real(args))
        raise SystemExit(0)

    monkeypatch.setattr(cli, "deployment_from_args", stop)
    with pytest.raises(SystemExit):
        cli.main(["generate", "--onnx-max-len", "512", "hi"])
    assert seen[0].draft.onnx_max_len == 512
    for bad in (1, "long", True):
        p.write_text(yaml.safe_dump({"draft": {"onnx_max_len": bad}}))
        with pytest.raises(ValueError, match="onnx_max_len"):
            DeploymentConfig.load(str(p))
