"""A two-node Ray cluster (ray.cluster_utils.Cluster): one node holds the target resource, the
other the draft accelerator; SPREAD placement puts the actors on different nodes and decoding is
still exactly plain decoding."""
import asyncio
import dataclasses

import pytest
import ray
from ray.cluster_utils import Cluster

from mirror.decoding.ar import generate_ar
from mirror.engine import GenerateArgs
from mirror.runtime.cluster import DistributedEngine
from mirror.runtime.config import DeploymentConfig, DraftConfig, RayConfig, TargetConfig
from mirror.sampling import SamplingParams
from mirror.spec_config import SpecConfig


# Starts Ray (or torch.distributed) and pins workers to cores: these tests share one pytest-xdist
# worker (see conftest.py), so two of them never run at once.
pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"mirror_target": 1}})
    c.add_node(num_cpus=1, resources={"mirror_draft_accel": 1})
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def test_target_and_draft_on_different_nodes_decode_exactly(cluster, bundled, local_target):
    deploy = dataclasses.replace(
        DeploymentConfig.local(), name="two-node", placement="SPREAD",
        ray=RayConfig(address=cluster.address),
        target=TargetConfig(num_cpus=1, threads=1, resource="mirror_target"),
        # a generous stall deadline: this test is about placement and exactness, and the suite
        # runs it beside other CPU-heavy tests (pytest-xdist) with two raylets on two cores;
        # the deadline itself is tested in test_channel.py
        draft=DraftConfig(num_cpus=1, threads=1, resource="mirror_draft_accel", deadline_ms=30000.0))
    eng = DistributedEngine(deploy)
    try:
        info = eng.runtime.info()
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        t_node, d_node = info["target"][0]["node_id"], info["draft"]["node_id"]
        assert t_node != d_node
        assert "mirror_target" in nodes[t_node] and "mirror_draft_accel" in nodes[d_node]
        prompt = bundled.tokenizer.encode_chat([{"role": "user", "content": "List three uses of copper."}])
        ref = generate_ar(local_target, bundled.tokenizer, prompt,  # the same target config as local()
                          SamplingParams(max_new_tokens=40, ignore_eos=True)).ids

        async def go():
            ids = []
            args = GenerateArgs(prompt, SamplingParams(max_new_tokens=40, ignore_eos=True),
                                SpecConfig(method="mirror", draft="ngram+self", draft_layers=2, budget=4))
            async for c in eng.generate(args, asyncio.Event()):
                ids += c.token_ids
            return ids

        assert asyncio.run(go()) == ref
        assert not eng.completed[-1]["degraded"]  # the draft on the other node did the drafting
    finally:
        eng.runtime.shutdown()


def test_the_embedded_runtime_starts_its_own_ray_beside_a_running_one(cluster):
    """A Ray already running on the machine (here the two-node test cluster, left up) must not
    capture the embedded default: it starts a fresh in-process Ray (ray.init would otherwise
    join the running one and refuse the num_cpus it is given)."""
    from mirror.runtime.cluster import start_ray

    if ray.is_initialized():
        ray.shutdown()
    start_ray(DeploymentConfig.local())
    try:
        assert ray.get_runtime_context().gcs_address != cluster.address
        assert ray.cluster_resources().get("mirror_target", 0) == 0  # not the cluster's nodes
    finally:
        ray.shutdown()
